"""TextWorld-Express (Jansen & Côté 2022; `textworld-express` package, a Java simulator): cookingworld, twc
(TextWorld Commonsense) and coin (Coin Collector). Thousands of steps per second and gold action sequences, a fast
env for demos and quick tests. Games are generated from a seed; each game has its own train / dev / test seeds.

Task id: "<game>-seed<seed>", e.g. "twc-seed123". One JVM per process (starting one costs ~0.5 s and ~100 MB),
shared by every env of the process: each env drives its own simulator object inside it.
"""
import json
from functools import cache

from textworld_express import TextWorldExpressEnv

GAMES = ("cookingworld", "twc", "coin")
SPLITS = ("train", "dev", "test")
# Small games (one room for cooking and twc, four for coin; the package defaults go up to 11 rooms, 98-step gold
# paths): gold paths of 2-14 steps, within reach of a small model in a short episode. Override with params=.
DEFAULT_PARAMS = {
    "cookingworld": "numLocations=1, numIngredients=2, numDistractorItems=3, includeDoors=0, limitInventorySize=0",
    "twc": "numLocations=1, numItemsToPutAway=2, includeDoors=0, limitInventorySize=0",
    "coin": "numLocations=4, numDistractorItems=0, includeDoors=0, limitInventorySize=0",
}


@cache
def _launcher() -> TextWorldExpressEnv:
    """This process's TextWorld-Express JVM, started on first use by the package's own class (kept alive here:
    dropping it shuts the JVM down)."""
    return TextWorldExpressEnv()


def _simulator(game: str, params: str):
    sim = _launcher()._gateway.jvm.textworldexpress.runtime.PythonInterface()
    error = sim.load(game, params)
    if error:
        raise ValueError(f"TextWorld-Express {game} with params {params!r}: {error}")
    return sim


@cache
def split_seeds(game: str, params: str, split: str) -> tuple[int, ...]:
    sim = _simulator(game, params)
    return tuple(sorted({"train": sim.getSeedsTrain, "dev": sim.getSeedsDev, "test": sim.getSeedsTest}[split]()))


def parse_task_id(task_id: str) -> tuple[str, int]:
    game, sep, seed = task_id.rpartition("-seed")
    if not sep or game not in GAMES or not seed.isdigit():
        raise ValueError(f"bad TextWorld-Express task id {task_id!r}: expected '<game>-seed<n>', game one of {GAMES}")
    return game, int(seed)


class TwxEnv:
    """One TextWorld-Express game at a time.

    obs: the simulator's text; info["instruction"]: the game's task description. valid = the command (stripped,
    as the simulator strips it) is one of the simulator's valid actions; anything else gets "Unknown action: I'm
    not sure what you mean." reward: the simulator's score change (partial credit for sub-goals); won = task
    success; done on success, failure (e.g. eating a wrong ingredient) or max_steps.
    info["gold"]: the next step of the simulator's gold action sequence while every valid action so far followed
    it exactly (invalid actions change nothing), else None (TextWorld-Express has no expert for other states).
    The game is fixed by its seed, and so is cookingworld's gold path; coin's and twc's gold paths come from a
    random walk that the package seeds from the clock: they always win, but may differ between resets of a seed
    (twc in one room has a single one).
    """

    def __init__(self, split: str, params: dict, max_steps: int | None = None):
        self.split, self.params, self.max_steps = split, params, max_steps
        self.sims = {}  # game -> its simulator object, reused across episodes

    def reset(self, task_id: str) -> tuple[str, dict]:
        game, seed = parse_task_id(task_id)
        if seed not in split_seeds(game, self.params[game], self.split):  # the simulator would play it anyway
            raise ValueError(f"TextWorld-Express task {task_id!r} is not in split {self.split!r}")
        if game not in self.sims:
            self.sims[game] = _simulator(game, self.params[game])
        self.sim = self.sims[game]
        state = json.loads(self.sim.generateNewGameJSON(seed, self.split, True))
        if state["observation"].startswith("ERROR"):
            raise ValueError(f"TextWorld-Express {task_id} ({self.split}): {state['observation']}")
        # the gold sequence opens with "look around", which repeats the first observation: skip it
        self.gold = [a for i, a in enumerate(self.sim.getGoldActionSequence()) if i > 0 or a != "look around"]
        self.on_gold, self.t, self.n_valid, self.score = True, 0, 0, 0.0
        self.admissible = sorted(state["validActions"])
        return state["observation"], {"instruction": self.sim.getTaskDescription(), "admissible": self.admissible,
                                      "gold": self.gold[0] if self.gold else None, "task_type": game}

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        command = action.strip()
        valid = command in self.admissible
        state = json.loads(self.sim.stepJSON(action))
        if valid:  # an invalid command changes nothing, so it cannot leave the gold path
            on_path = self.n_valid < len(self.gold) and command == self.gold[self.n_valid]
            self.on_gold, self.n_valid = self.on_gold and on_path, self.n_valid + 1
        self.t += 1
        reward, self.score = state["score"] - self.score, state["score"]
        self.admissible = sorted(state["validActions"])
        won = bool(state["tasksuccess"])
        done = won or bool(state["taskfailure"]) or (self.max_steps is not None and self.t >= self.max_steps)
        gold = self.gold[self.n_valid] if self.on_gold and self.n_valid < len(self.gold) else None
        return state["observation"], float(reward), done, {"won": won, "valid": valid, "admissible": self.admissible,
                                                           "gold": gold}

    def close(self) -> None:
        self.sims.clear()  # frees the simulator objects; the JVM stays up for the process's other envs


class TwxSuite:
    """make_env("twx", split, games=("cookingworld", "twc", "coin"), params=None, max_steps=None);
    split: train | dev | test (each game's own seed folds, 1000 seeds each); params: {game: "k=v, ..."}
    overriding DEFAULT_PARAMS."""

    def __init__(self, split: str, games: tuple[str, ...] = GAMES, params: dict | None = None,
                 max_steps: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"unknown TextWorld-Express split {split!r}: expected one of {', '.join(SPLITS)}")
        unknown = [g for g in games if g not in GAMES]
        if unknown:
            raise ValueError(f"unknown TextWorld-Express games {unknown}: expected some of {', '.join(GAMES)}")
        self.split, self.max_steps = split, max_steps
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        self.task_ids = []
        for game in games:
            self.task_ids += [f"{game}-seed{seed}" for seed in split_seeds(game, self.params[game], split)]

    def make(self) -> TwxEnv:
        return TwxEnv(self.split, self.params, self.max_steps)
