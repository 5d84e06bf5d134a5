"""ALFWorld on the official games, through the official engine: alfworld 0.4.2's wrappers (AlfredDemangler,
AlfredInfos) over TextWorld's gym env, which plays the ALFRED PDDL domain. Nothing here re-implements the game.

Data: $ALFWORLD_DATA (alfworld's own convention: the folder holding json_2.1.1; default ~/.cache/alfworld),
filled by `alfworld-download` where there is internet, or offline by
    python -m envs.alfworld unpack json_2.1.1.tar.xz [--dest DIR]     (then export ALFWORLD_DATA=DIR)
Splits: train (3,553 games), valid_seen (140, the paper's in-distribution eval), valid_unseen (134, out of
distribution), valid_train (200). Task id = the game file's path relative to json_2.1.1.
"""
import argparse
import json
import os
import random
import tarfile
from collections import Counter
from pathlib import Path

import textworld
from alfworld.agents.environment.alfred_tw_env import TASK_TYPES, AlfredDemangler, AlfredInfos
from alfworld.agents.expert import HandCodedTWAgent
from textworld.gym.envs import TextworldGymEnv

SPLITS = ("train", "valid_seen", "valid_unseen", "valid_train")
# facts feed the hand-coded expert; the walkthrough is the game's recorded solution
REQUEST_INFOS = textworld.EnvInfos(won=True, admissible_commands=True, facts=True, extras=["gamefile", "walkthrough"])
TASK_PREFIX = "Your task is to: "


def missing_data(what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"ALFWorld games not found: {what}.\n"
        "ALFWorld reads its games from $ALFWORLD_DATA, the folder holding json_2.1.1 (default ~/.cache/alfworld).\n"
        "Get them one of two ways:\n"
        "  with internet:  alfworld-download    (the alfworld package's command; fills $ALFWORLD_DATA)\n"
        "  offline:        python -m envs.alfworld unpack json_2.1.1.tar.xz    (e.g. ../shared/alfworld/), "
        "then export ALFWORLD_DATA=<the folder it prints>")


def games_dir(data_dir: str | Path | None = None) -> Path:
    """The json_2.1.1 folder under data_dir (default $ALFWORLD_DATA, then ~/.cache/alfworld; note that importing
    alfworld creates that folder and sets $ALFWORLD_DATA to it when unset, as alfworld.info does)."""
    data = Path(data_dir or os.environ.get("ALFWORLD_DATA") or "~/.cache/alfworld").expanduser()
    games = data / "json_2.1.1"
    if not games.is_dir():
        raise missing_data(f"{games} does not exist")
    return games


def collect_games(games: Path, split: str, task_types: list[str] | None = None) -> list[str]:
    """Game files of a split, as the official loader (AlfredTWEnv.collect_game_files) picks them: a trial folder
    with traj_data.json and game.tw-pddl, not movable/sliced, of a wanted task type, marked solvable.
    Returns paths relative to `games`, sorted."""
    if split not in SPLITS:
        raise ValueError(f"unknown ALFWorld split {split!r}: expected one of {', '.join(SPLITS)}")
    wanted = list(TASK_TYPES.values()) if task_types is None else list(task_types)
    unknown = [t for t in wanted if t not in TASK_TYPES.values()]
    if unknown:
        raise ValueError(f"unknown ALFWorld task types {unknown}: expected some of {', '.join(TASK_TYPES.values())}")
    if not (games / split).is_dir():
        raise missing_data(f"{games / split} does not exist (the data dir is incomplete)")
    found = []
    for traj_file in sorted((games / split).glob("*/*/traj_data.json")):
        game_file = traj_file.parent / "game.tw-pddl"
        if "movable" in str(traj_file) or "Sliced" in str(traj_file) or not game_file.is_file():
            continue
        task_type = json.loads(traj_file.read_text())["task_type"]
        if task_type in wanted and json.loads(game_file.read_text()).get("solvable"):
            found.append(str(game_file.relative_to(games)))
    if not found:
        raise missing_data(f"no solvable games (trial folders with traj_data.json + game.tw-pddl) of task types "
                           f"{wanted} under {games / split}")
    return found


class AlfworldEnv:
    """One ALFWorld game at a time. reset loads the game (1-2 s: TextWorld compiles the PDDL), a step costs
    about 50 ms.

    Observations are ALFWorld's own text; after reset the banner ("-= Welcome to TextWorld, ALFRED! =-") is
    dropped and the task sentence goes to info["instruction"] (without its "Your task is to: " prefix).
    valid = the command (stripped, as the engine strips it) is one of the admissible commands; anything else,
    empty, huge, non-ASCII or multi-line, reaches the engine, which answers "Nothing happens.".
    reward = 1.0 on the step that wins, else 0.0.

    info["gold"]: the game's walkthrough step while every valid action so far followed the walkthrough exactly
    (the walkthrough always wins; invalid actions change nothing), else the move of alfworld's official
    hand-coded expert (HandCodedTWAgent), which has watched the whole episode. The expert is a heuristic, NOT a
    perfect oracle: it may wander, loop or give up (it won 14 of 16 valid_seen games after 5 random steps);
    gold is None once it has failed or when its move is not admissible. Its random choices use a generator
    seeded by the task id, so an episode replays identically.
    """

    def __init__(self, games: Path, max_steps: int | None = None):
        self.games, self.max_steps = Path(games), max_steps
        self.gym, self.game = None, None

    def reset(self, task_id: str) -> tuple[str, dict]:
        path = self.games / task_id
        if not path.is_file():
            raise FileNotFoundError(f"ALFWorld game {path} not found (task id {task_id!r})")
        if self.gym is None or self.game != path:
            # every new TextWorld env loads its own copy of fast-downward's library (~4 MB resident, never freed):
            # resetting the same game again (replays: collect.py --alternatives) restarts the env it has
            self.close()
            self.gym = TextworldGymEnv([str(path)], REQUEST_INFOS,
                                       wrappers=[AlfredDemangler(shuffle=False), AlfredInfos])
            self.game = path
        raw, infos = self.gym.reset()
        text = raw.split("\n\n", 1)[-1]  # drop the banner
        obs, sep, instruction = text.rpartition("\n\n" + TASK_PREFIX)
        if not sep:
            raise ValueError(f"{path}: no '{TASK_PREFIX}' sentence in the first observation {raw!r}")
        self.walkthrough = infos["extra.walkthrough"] or []
        self.on_walkthrough, self.t, self.n_valid = True, 0, 0  # steps taken, valid ones among them
        self.admissible = infos["admissible_commands"]
        self.expert = HandCodedTWAgent(max_steps=200)  # as alfworld's AlfredExpert wrapper does
        self.expert.reset(str(path))  # reads task_type and pddl_params from traj_data.json beside the game
        self.expert.observe(raw)
        self.expert_rng = random.Random(task_id).getstate()
        task_type = json.loads((path.parent / "traj_data.json").read_text())["task_type"]
        gold = self.walkthrough[0] if self.walkthrough else None
        return obs, {"instruction": instruction, "admissible": self.admissible, "gold": gold, "task_type": task_type}

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        command = action.strip()
        valid = command in self.admissible
        obs, _, done, infos = self.gym.step(action)
        if valid:  # an invalid command changes nothing, so it cannot leave the walkthrough
            on_path = self.n_valid < len(self.walkthrough) and command == self.walkthrough[self.n_valid]
            self.on_walkthrough, self.n_valid = self.on_walkthrough and on_path, self.n_valid + 1
        self.t += 1
        self.admissible = infos["admissible_commands"]
        expert_move = self._expert_act(obs, infos, self._for_expert(command) if valid else "look")
        on_walkthrough = self.on_walkthrough and self.n_valid < len(self.walkthrough)
        gold = self.walkthrough[self.n_valid] if on_walkthrough else expert_move
        won = bool(infos["won"])
        done = bool(done) or (self.max_steps is not None and self.t >= self.max_steps)
        return obs, float(won), done, {"won": won, "valid": valid, "admissible": self.admissible, "gold": gold}

    @staticmethod
    def _for_expert(command: str) -> str:
        """The command as the expert's bookkeeping reads it. alfworld 0.4's grammar says "move X to Y" where the
        expert's inventory tracking still looks for "put" (it emits "move" itself, but never sees its object
        leave its hands); without this it wins 11/16 valid_seen games after 5 random steps, with it 14/16."""
        return "put " + command[len("move "):] if command.startswith("move ") else command

    def _expert_act(self, obs: str, infos: dict, last_action: str) -> str | None:
        """The expert watches every step (alfworld's AlfredExpert wrapper feeds it the same way) and answers its
        next move. An invalid command changed nothing; it is shown "look" (a no-op for its bookkeeping) so that
        e.g. an invalid "go to the moon" does not make it think the agent moved."""
        if self.expert is None:
            return None
        state = {"feedback": obs, "facts": infos["facts"], "admissible_commands": infos["admissible_commands"]}
        # the expert draws from the global `random`; swap in this episode's generator so runs replay exactly
        # and the caller's random state is left alone
        outer = random.getstate()
        random.setstate(self.expert_rng)
        try:
            move = self.expert.act(state, 0, infos["won"], last_action)
        except Exception:  # noqa: BLE001 -- HandCodedAgentTimeout/Failed, or its heuristics break on an odd state
            self.expert, move = None, None
        finally:
            self.expert_rng = random.getstate()
            random.setstate(outer)
        return move if move in self.admissible else None

    def close(self) -> None:
        if self.gym is not None:
            self.gym.close()
            self.gym = None


class AlfworldSuite:
    """make_env("alfworld", split, data_dir=None, task_types=None, max_steps=None)."""

    def __init__(self, split: str, data_dir: str | Path | None = None, task_types: list[str] | None = None,
                 max_steps: int | None = None):
        self.split, self.max_steps = split, max_steps
        self.games = games_dir(data_dir)
        self.task_ids = collect_games(self.games, split, task_types)

    def make(self) -> AlfworldEnv:
        return AlfworldEnv(self.games, self.max_steps)


def game_table(data_dir: str | Path | None = None) -> str:
    """Markdown table: games per split and task type, as the loader finds them."""
    games = games_dir(data_dir)
    types = sorted(TASK_TYPES.values())
    lines = ["| split | games | " + " | ".join(types) + " |", "|---" * (len(types) + 2) + "|"]
    for split in SPLITS:
        counts = Counter(task_id.split("/")[1].split("-")[0] for task_id in collect_games(games, split))
        lines.append(f"| {split} | {sum(counts.values())} | " + " | ".join(str(counts[t]) for t in types) + " |")
    return "\n".join(lines)


def unpack(archive: Path, dest: Path) -> Path:
    """Unpacks an archive of the official json_2.1.1 folder into dest; returns dest (the ALFWORLD_DATA value)."""
    if not archive.is_file():
        raise FileNotFoundError(f"{archive}: no such archive")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        stray = [n for n in names if n.split("/")[0] != "json_2.1.1"]
        if not names or stray:
            raise ValueError(f"{archive}: expected an archive of the json_2.1.1 folder, "
                             f"found e.g. {stray[:3] or 'nothing'}")
        dest.mkdir(parents=True, exist_ok=True)
        tar.extractall(dest, filter="data")  # "data": no absolute paths, links or devices out of dest
    return dest


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m envs.alfworld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("unpack", help="unpack an archive of json_2.1.1 (e.g. ../shared/alfworld/json_2.1.1.tar.xz)")
    p.add_argument("archive", type=Path)
    cache = Path(os.environ.get("RWML_CACHE") or "~/.cache/rwml").expanduser()
    p.add_argument("--dest", type=Path, default=cache / "alfworld", help="default: $RWML_CACHE/alfworld")
    p = sub.add_parser("count", help="games per split and task type in $ALFWORLD_DATA (or --data-dir)")
    p.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "unpack":
            dest = unpack(args.archive, args.dest.expanduser().resolve())
            print(game_table(dest))
            print(f"\nexport ALFWORLD_DATA={dest}")
        else:
            print(game_table(args.data_dir))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
