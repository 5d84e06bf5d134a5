"""envs/: ALFWorld on the official games (fixtures here; the full set when $ALFWORLD_DATA holds it),
TextWorld-Express, and the batched EnvPool."""
import io
import os
import random
import tarfile
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from envs import make_env
from envs.alfworld import SPLITS
from envs.alfworld import main as alfworld_main
from envs.base import EnvPool
from envs.textworld_express import GAMES

FIXTURES = Path(__file__).parent / "fixtures" / "alfworld"
HOSTILE = ["", "   ", "x" * 100_000, "é☃ 你好 🙂", "go to\nlook", "look\x00", "GO TO DRAWER 1", "look; rm -rf /",
           "put the moon in the fridge"]


def play(env, task_id, policy, max_steps=60):
    """Plays an episode, policy(t, info) -> action; returns [(obs, info)] + [(obs, reward, done, info)] per step."""
    obs, info = env.reset(task_id)
    out = [(obs, info)]
    for t in range(max_steps):
        obs, reward, done, info = env.step(policy(t, info))
        out.append((obs, reward, done, info))
        if done:
            break
    return out


def follow_gold(t, info):
    assert info["gold"] is not None, "gold action missing"
    return info["gold"]


def fixture_games():
    return [(split, task_id) for split in SPLITS for task_id in make_env("alfworld", split, data_dir=FIXTURES).task_ids]


# --- ALFWorld ---------------------------------------------------------------------------------------------------

def test_alfworld_loader_on_fixtures():
    games = fixture_games()
    assert len(games) == 7 and {split for split, _ in games} == set(SPLITS)
    task_types = {task_id.split("/")[1].split("-")[0] for _, task_id in games}
    assert len(task_types) == 6  # every ALFWorld task type
    for split, task_id in games:
        assert task_id.startswith(split + "/") and task_id.endswith("/game.tw-pddl")
    only = make_env("alfworld", "valid_unseen", data_dir=FIXTURES, task_types=["pick_clean_then_place_in_recep"])
    assert len(only.task_ids) == 1 and "pick_clean" in only.task_ids[0]
    with pytest.raises(ValueError, match="valid_seen"):
        make_env("alfworld", "test", data_dir=FIXTURES)
    with pytest.raises(ValueError, match="task types"):
        make_env("alfworld", "train", data_dir=FIXTURES, task_types=["cook"])


def test_alfworld_gold_wins_every_fixture_game():
    env = make_env("alfworld", "train", data_dir=FIXTURES).make()  # one env serves every game
    for _, task_id in fixture_games():
        episode = play(env, task_id, follow_gold)
        obs, info = episode[0]
        assert "Welcome" not in obs and "Your task is to" not in obs and obs.startswith("You are in the middle")
        assert info["instruction"] and info["task_type"] in task_id
        assert all(step[3]["valid"] for step in episode[1:]), task_id
        obs, reward, done, info = episode[-1]
        assert done and info["won"] and reward == 1.0, (task_id, obs)
        assert len(episode) - 1 == len(env.walkthrough)  # on the walkthrough, gold is the walkthrough
        assert [r for _, r, _, _ in episode[1:-1]] == [0.0] * (len(episode) - 2)


def test_alfworld_hostile_actions_are_invalid_not_errors():
    env = make_env("alfworld", "valid_seen", data_dir=FIXTURES, max_steps=40).make()
    task_id = "valid_seen/look_at_obj_in_light-CD-None-DeskLamp-320/trial_T20190907_224451_655673/game.tw-pddl"
    _, info0 = env.reset(task_id)
    for action in HOSTILE:
        obs, reward, done, info = env.step(action)
        assert (obs, reward, done, info["valid"], info["won"]) == ("Nothing happens.", 0.0, False, False, False)
        assert info["admissible"] == info0["admissible"] and info["gold"] == info0["gold"]
    assert env.step(" " + info0["gold"] + "\n")[3]["valid"]  # the engine strips commands, so do we
    _, _, done, info = play(env, task_id, follow_gold)[-1]  # junk changed nothing: the walkthrough still wins
    assert done and info["won"]


def test_alfworld_random_play_is_safe_and_reproducible():
    suite = make_env("alfworld", "valid_unseen", data_dir=FIXTURES, max_steps=25)
    rng = random.Random(0)

    def policy(t, info):  # mostly admissible commands, some junk
        return rng.choice(HOSTILE) if rng.random() < 0.2 else rng.choice(info["admissible"])

    task_id = suite.task_ids[0]
    first = play(suite.make(), task_id, policy, max_steps=30)
    assert len(first) == 26 and first[-1][2]  # max_steps ends the episode
    for obs, reward, done, info in first[1:]:
        assert isinstance(obs, str) and isinstance(info["valid"], bool)
        assert info["gold"] is None or info["gold"] in info["admissible"]
    rng.seed(0)
    assert play(suite.make(), task_id, policy, max_steps=30) == first  # same actions, same episode


def test_alfworld_expert_gold_recovers_after_a_detour():
    """Off the walkthrough, gold comes from alfworld's hand-coded expert (a heuristic; these games it solves)."""
    suite = make_env("alfworld", "train", data_dir=FIXTURES)
    env = suite.make()
    random.seed(123)
    callers_random_state = random.getstate()
    for task_id in suite.task_ids:
        rng, actions = random.Random(1), []
        _, _, done, info = play(env, task_id, detour_then_gold(rng, actions))[-1]
        assert actions[:4] != env.walkthrough[:4]  # the detour left the walkthrough: gold came from the expert
        assert done and info["won"], task_id
    assert random.getstate() == callers_random_state  # the expert draws from its own generator


def detour_then_gold(rng, actions):
    def policy(t, info):
        actions.append(rng.choice(info["admissible"]) if t < 4 else follow_gold(t, info))
        return actions[-1]
    return policy


def test_alfworld_bad_data_dir_says_how_to_get_the_games(tmp_path, monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError) as e:
        make_env("alfworld", "train")
    message = str(e.value)
    assert "nowhere/json_2.1.1 does not exist" in message and "$ALFWORLD_DATA" in message
    assert "alfworld-download" in message and "python -m envs.alfworld unpack" in message
    (tmp_path / "json_2.1.1" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="valid_seen does not exist"):
        make_env("alfworld", "valid_seen", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no solvable games"):
        make_env("alfworld", "train", data_dir=tmp_path)


def test_alfworld_unpack_archive(tmp_path):
    archive = tmp_path / "games.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(FIXTURES / "json_2.1.1", arcname="json_2.1.1")
    out = io.StringIO()
    with redirect_stdout(out):
        alfworld_main(["unpack", str(archive), "--dest", str(tmp_path / "data")])
    assert f"export ALFWORLD_DATA={tmp_path / 'data'}" in out.getvalue()
    assert "| valid_unseen | 2 |" in out.getvalue()
    assert make_env("alfworld", "valid_seen", data_dir=tmp_path / "data").task_ids == \
        make_env("alfworld", "valid_seen", data_dir=FIXTURES).task_ids
    stray = tmp_path / "stray.tar"
    with tarfile.open(stray, "w") as tar:
        tar.add(archive, arcname="other/games.tar.xz")
    with pytest.raises(SystemExit, match="json_2.1.1 folder"):
        alfworld_main(["unpack", str(stray), "--dest", str(tmp_path / "data2")])


def full_set() -> Path | None:
    data = os.environ.get("ALFWORLD_DATA")
    if data and all((Path(data) / "json_2.1.1" / split).is_dir() for split in SPLITS):
        return Path(data)
    return None


@pytest.mark.slow
@pytest.mark.skipif(full_set() is None, reason="full ALFWorld set not found: set ALFWORLD_DATA to a folder holding "
                    "json_2.1.1 (python -m envs.alfworld unpack ../shared/alfworld/json_2.1.1.tar.xz)")
def test_alfworld_full_set_counts_and_gold():
    official = {"train": 3553, "valid_seen": 140, "valid_unseen": 134, "valid_train": 200}  # SOURCES.md
    rng = random.Random(0)
    for split in SPLITS:
        suite = make_env("alfworld", split, data_dir=full_set())
        assert len(suite.task_ids) == official[split]
        env = suite.make()
        for task_id in rng.sample(suite.task_ids, 2):
            _, _, done, info = play(env, task_id, follow_gold)[-1]
            assert done and info["won"], task_id


# --- TextWorld-Express ------------------------------------------------------------------------------------------

def test_twx_gold_paths_win():
    for split in ("train", "test"):
        suite = make_env("twx", split)
        assert len(suite.task_ids) == 3000 and suite.task_ids[0].startswith("cookingworld-seed")
        env = suite.make()
        for game in GAMES:
            for task_id in [t for t in suite.task_ids if t.startswith(game)][:3]:
                episode = play(env, task_id, follow_gold)
                assert episode[0][1]["task_type"] == game and episode[0][1]["instruction"]
                _, _, done, info = episode[-1]
                assert done and info["won"], task_id
                assert sum(r for _, r, _, _ in episode[1:]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in split"):
        env.reset("twc-seed0")  # a train seed asked of the test split
    with pytest.raises(ValueError, match="task id"):
        env.reset("zork-seed1")


def test_twx_hostile_actions_and_max_steps():
    env = make_env("twx", "dev", max_steps=len(HOSTILE)).make()
    _, info0 = env.reset("cookingworld-seed10000")
    for t, action in enumerate(HOSTILE):
        obs, reward, done, info = env.step(action)
        assert not info["valid"] and reward == 0.0 and obs.startswith("Unknown action")
        assert info["gold"] == info0["gold"] and info["admissible"] == info0["admissible"]
        assert done == (t + 1 == len(HOSTILE))
    env.reset("cookingworld-seed10000")
    _, _, _, info = env.step("inventory")  # valid, but off the gold path: TextWorld-Express has no expert
    assert info["valid"] and info["gold"] is None


# --- EnvPool ----------------------------------------------------------------------------------------------------

def scripted(t, info):
    """Gold with junk mixed in: exercises valid, invalid and off-walkthrough (expert) steps."""
    return ["look", "xyzzy", info["gold"] or "look"][t % 3]


def run_pool(pool, tasks, n_steps):
    """Plays tasks in slots 0..n-1 together; returns each slot's transitions."""
    out = {slot: [r] for slot, r in enumerate(pool.reset_many(list(enumerate(tasks))))}
    live = set(out)
    for t in range(n_steps):
        slots = sorted(live)
        results = pool.step_many([(s, scripted(t, out[s][-1][-1])) for s in slots])
        for slot, result in zip(slots, results):
            out[slot].append(result)
            if result[2]:
                live.discard(slot)
    return [out[slot] for slot in range(len(tasks))]


@pytest.mark.parametrize("name", ["alfworld", "twx"])
def test_pool_matches_single_stepping(name):
    kw = {"data_dir": FIXTURES} if name == "alfworld" else {}
    suite = make_env(name, "valid_seen" if name == "alfworld" else "dev", **kw)
    # (not coin: TextWorld-Express draws coin's gold path from a clock-seeded random walk)
    tasks = suite.task_ids[:2] if name == "alfworld" else ["cookingworld-seed10003", "twc-seed10007"]
    n_steps = 12
    single = [play(suite.make(), task_id, scripted, max_steps=n_steps) for task_id in tasks]
    with EnvPool(suite, n_workers=2) as pool:
        assert run_pool(pool, tasks, n_steps) == single
        assert run_pool(pool, tasks[::-1], n_steps) == single[::-1]  # slots reused for other games
    if name == "twx":  # in-process: the same code without workers (cheap to check on the fast env)
        with EnvPool(suite, n_workers=0) as pool:
            assert run_pool(pool, tasks, n_steps) == single


class FakeEnv:
    """Steps count up; "raise" raises, "crash" kills the worker process, "hang" stalls it."""

    def reset(self, task_id):
        self.t = 0
        return task_id, {"instruction": "", "admissible": None, "gold": None, "task_type": "fake"}

    def step(self, action):
        if action == "raise":
            raise RuntimeError("broken game")
        if action == "crash":
            os._exit(3)
        if action == "hang":
            time.sleep(60)
        self.t += 1
        return f"t={self.t}", 0.0, False, {"won": False, "valid": True, "admissible": None, "gold": None}

    def close(self):
        pass


class FakeSuite:
    def __init__(self):
        self.task_ids = ["a", "b"]

    def make(self):
        return FakeEnv()


def test_pool_failures_end_their_episode_only():
    with EnvPool(FakeSuite(), n_workers=2, timeout_s=3) as pool:
        pool.reset_many([(0, "a"), (1, "b")])  # one reset per worker: slots 0 and 1 live in different workers
        for bad in ["raise", "crash", "hang"]:
            (_, _, done, info), (obs, _, done_ok, _) = pool.step_many([(0, bad), (1, "go")])
            assert done and info["error"] and not done_ok and obs.startswith("t="), bad
            assert "error" in pool.step_many([(0, "go")])[0][3]  # the failed episode is gone
            assert pool.reset_many([(0, "a")]) == [("a", FakeEnv().reset("a")[1])]  # its slot takes a new one
        assert pool.step_many([(1, "go")])[0][0] == "t=4"  # the other episode went on throughout
    with EnvPool(FakeSuite(), n_workers=0) as pool:
        pool.reset_many([(0, "a")])
        assert pool.step_many([(0, "raise")])[0][3]["error"] == "RuntimeError: broken game"


def test_make_env_rejects_unknown_env():
    with pytest.raises(ValueError, match="alfworld, twx, tau2"):
        make_env("zork", "train")
