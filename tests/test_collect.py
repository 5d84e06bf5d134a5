"""collect.py and rollout.py: the batched episode loop, the files it writes, triples, resume, robustness."""
import json
import os
import random
from pathlib import Path

import pytest

import collect
from common import Sample, read_jsonl, save_config
from prompts import parse_action
from rollout import episode_triples, run_episodes

FIXTURES = Path(__file__).parent / "fixtures" / "alfworld"
EPISODE_KEYS = ("env", "split", "task_id", "instruction", "rollout", "model", "steps", "success", "n_steps")
STEP_KEYS = {"obs", "action", "response", "valid", "next_obs", "reward", "done"}
TRIPLE_KEYS = ("id", "env", "task_id", "instruction", "history", "state", "action", "next_state", "next_kind", "meta")


@pytest.fixture(autouse=True)
def alfworld_fixtures(monkeypatch):
    monkeypatch.setenv("ALFWORLD_DATA", str(FIXTURES))


def reply(action: str) -> Sample:
    return Sample([], [], f"<think>scripted</think><action>{action}</action>", [], True)


def expert(messages_list, infos):
    return [reply(info["gold"]) for info in infos]


def mixed_actor(seed=0):
    """Gold (or the first admissible) action mostly; sometimes no tags, sometimes a non-admissible action."""
    rng = random.Random(seed)

    def act(messages_list, infos):
        out = []
        for info in infos:
            r = rng.random()
            if r < 0.2:
                out.append(Sample([], [], "I will just look around, no tags", [], False))
            elif r < 0.4:
                out.append(reply("fly to the moon"))
            else:
                out.append(reply(info["gold"] or info["admissible"][0]))
        return out
    return act


def settings(tmp_path, **kw) -> collect.Settings:
    base = dict(model="tiny", rollouts=1, max_env_steps=3, max_new_tokens=8, batch_size=4, out_dir=str(tmp_path / "out"))
    return collect.Settings(**{**base, **kw})


def check_outputs(s: collect.Settings) -> tuple[list[dict], list[dict]]:
    """Every file valid; the triples are exactly the valid steps of the episodes, lined up with them."""
    out = Path(s.out_dir)
    episodes = read_jsonl(out / "episodes.jsonl", required=EPISODE_KEYS)
    triples = read_jsonl(out / "triples.jsonl", required=TRIPLE_KEYS)
    assert json.loads((out / "config.json").read_text())["seed"] == s.seed
    assert len({(e["task_id"], e["rollout"]) for e in episodes}) == len(episodes)
    by_id = {t["id"]: t for t in triples}
    assert len(by_id) == len(triples)
    n_steps = n_invalid = 0
    for e in episodes:
        assert "error" not in e, e["error"]
        assert e["n_steps"] == len(e["steps"]) <= s.max_env_steps and e["env"] == s.env and e["split"] == s.split
        assert e["success"] == (e["steps"][-1]["done"] and e["success"])  # a win ends the episode
        for t, step in enumerate(e["steps"]):
            assert set(step) >= STEP_KEYS and "sample" not in step
            if t + 1 < len(e["steps"]):
                assert e["steps"][t + 1]["obs"] == step["next_obs"]
            n_steps += 1
            triple_id = f"{e['task_id']}#{e['rollout']}#{t}"
            if not step["valid"]:
                n_invalid += 1
                assert triple_id not in by_id
                continue
            tr = by_id.pop(triple_id)
            assert (tr["state"], tr["action"], tr["next_state"]) == (step["obs"], step["action"], step["next_obs"])
            assert tr["history"] == [{"obs": p["obs"], "action": p["action"]}
                                     for p in e["steps"][max(0, t - s.history):t]]
            assert (tr["env"], tr["task_id"], tr["instruction"], tr["next_kind"]) == (
                e["env"], e["task_id"], e["instruction"], "obs")
    assert not by_id  # no triple without its step
    train = read_jsonl(out / "triples_train.jsonl")
    val = read_jsonl(out / "triples_val.jsonl")
    assert sorted(t["id"] for t in train + val) == sorted(t["id"] for t in triples)
    if s.val_split == "tasks":
        assert not {t["task_id"] for t in train} & {t["task_id"] for t in val}
    else:
        assert len(val) == (max(1, round(s.val_frac * len(triples))) if len(triples) > 1 else 0)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["episodes"] == len(episodes) and stats["env_steps"] == n_steps
    assert stats["triples_kept"] == len(triples) == n_steps - n_invalid == n_steps - stats["triples_dropped"]
    assert stats["invalid_action_rate"] == pytest.approx(n_invalid / n_steps)
    assert stats["success_rate"] == pytest.approx(sum(e["success"] for e in episodes) / len(episodes))
    return episodes, triples


# ---------------------------------------------------------------------------------------------------------
# The loop on a fake env: batching, robustness

class FakeEnv:
    """Task "n<k>" ends after k steps; "boom" raises at its 2nd step; "broken" raises at reset;
    "die" kills its worker process at the 1st step."""

    def reset(self, task_id):
        if task_id == "broken":
            raise RuntimeError("cannot load this game")
        self.task, self.t = task_id, 0
        return f"{task_id} start", {"instruction": f"finish {task_id}", "admissible": ["go", "wait"], "gold": "go"}

    def step(self, action):
        self.t += 1
        if self.task == "boom" and self.t == 2:
            raise RuntimeError("engine crashed")
        if self.task == "die":
            os._exit(3)
        done = self.task.startswith("n") and self.t >= int(self.task[1:])
        return f"{self.task} t{self.t}", float(done), done, {"won": done, "valid": action in ("go", "wait"),
                                                             "admissible": ["go", "wait"], "gold": "go"}

    def close(self):
        pass


class FakeSuite:
    task_ids = []

    def make(self):
        return FakeEnv()


def test_live_episodes_generate_together_and_new_jobs_take_free_slots():
    calls = []

    def act(messages_list, infos):
        calls.append(len(messages_list))
        return [reply("go") for _ in infos]

    jobs = [("n1", 0), ("n3", 0), ("n2", 0), ("n1", 1), ("n2", 1)]
    episodes = run_episodes(act, FakeSuite(), jobs, env="fake", split="x", batch_size=3)
    # turn 1: n1 n3 n2 act (n1 ends); turn 2: n3 n2 (n2 ends, n1#1 loaded meanwhile); turn 3: n3 n1#1 (both end,
    # n2#1 loaded); turns 4-5: n2#1 alone
    assert calls == [3, 2, 2, 1, 1]
    assert [(e["task_id"], e["rollout"], e["n_steps"], e["success"]) for e in episodes] == [
        ("n1", 0, 1, True), ("n3", 0, 3, True), ("n2", 0, 2, True), ("n1", 1, 1, True), ("n2", 1, 2, True)]
    assert all(isinstance(st["sample"], Sample) for e in episodes for st in e["steps"])


def test_garbage_replies_are_invalid_and_a_broken_env_fails_only_its_episode():
    garbage = ["", "<action>", "<action>GO</action>", "<action>go\nwait</action>", "\x00" * 1000, "<action>gö</action>",
               "<action>jump</action>"]
    rng = random.Random(0)
    done_order = []

    def act(messages_list, infos):
        return [Sample([], [], rng.choice(garbage), [], False) for _ in infos]

    jobs = [("n4", 0), ("boom", 0), ("broken", 0), ("n2", 0)]
    episodes = run_episodes(act, FakeSuite(), jobs, env="fake", split="x", batch_size=2, max_env_steps=3,
                            on_done=lambda e: done_order.append(e["task_id"]))
    n4, boom, broken, n2 = episodes
    assert sorted(done_order) == sorted(t for t, _ in jobs)
    assert "error" not in n4 and n4["n_steps"] == 3 and not n4["success"]  # cut at max_env_steps, env not done
    assert not n4["steps"][-1]["done"]
    assert "engine crashed" in boom["error"] and boom["n_steps"] == 1 and not boom["success"]
    assert "cannot load" in broken["error"] and broken["steps"] == [] and not broken["success"]
    assert "error" not in n2
    for e in (n4, n2):
        for st in e["steps"]:  # "<action>GO</action>" lowercases to the admissible "go": the only valid reply
            assert st["valid"] == (st["response"] == "<action>GO</action>")


def test_a_crashed_worker_fails_its_episode_and_the_run_goes_on():
    episodes = run_episodes(expert, FakeSuite(), [("n2", 0), ("die", 0), ("n3", 0)], env="fake", split="x",
                            n_workers=2, batch_size=3)
    assert [e.get("error") is None for e in episodes] == [True, False, True]
    assert "worker" in episodes[1]["error"] and [e["success"] for e in episodes] == [True, False, True]


class FakeTau2Env:
    """τ²'s shape: no admissible list, a system prompt, user info, the agent's chat and tools in the info, next_kind
    "tool" | "user"; a call to "Bad_Tool" runs and fails (executed, invalid), an empty action is rejected unrun
    (not executed)."""
    TOOLS = [{"type": "function", "function": {"name": "Get_Order", "parameters": {}}}]

    def reset(self, task_id):
        self.t = 0
        self.chat = [{"role": "system", "content": "SYS POLICY"}, {"role": "user", "content": "where is my order?"}]
        return "user: where is my order?", {"instruction": "help the user", "admissible": None, "gold": None,
                                            "task_type": "retail", "next_kind": "user", "system_prompt": "SYS POLICY",
                                            "user_info": "name: Ann", "messages": list(self.chat), "tools": self.TOOLS}

    def step(self, action):
        self.t += 1
        tool, error = action.startswith("{") or not action, "Bad_Tool" in action or not action
        obs = ("tool: Error: no such tool" if error else 'tool: {"order_id": "#W1", "items": [{"price": 10.5}]}'
               if tool else "user: thanks")
        kind, reply = obs.split(": ", 1)
        self.chat += [{"role": "assistant", "content": action}, {"role": kind, "content": reply}]
        return obs, float(self.t == 4), self.t == 4, {"won": self.t == 4, "valid": not error, "executed": bool(action),
                                                      "admissible": None, "gold": None, "next_kind": kind,
                                                      "messages": list(self.chat), "tools": self.TOOLS}

    def close(self):
        pass


class FakeTau2Suite(FakeSuite):
    def make(self):
        return FakeTau2Env()


def test_tau2_shaped_env_system_prompt_kinds_and_masked_tool_replies():
    replies = ['<tool_call>{"name": "Get_Order", "arguments": {"order_id": "#W1"}}</tool_call>',
               '<think>try</think><tool_call>{"name": "Bad_Tool", "arguments": {}}</tool_call>',
               "It costs 10.5 USD.", "<think>thought, then said nothing</think>"]
    prompts = []

    def act(messages_list, infos):
        prompts.append((messages_list[0], infos[0]["tools"]))
        return [Sample([], [], replies[len(prompts) - 1], [], True)]

    (episode,) = run_episodes(act, FakeTau2Suite(), [("retail/1", 0)], env="tau2", split="train", history=5)
    # the agent sees the env's chat (its system prompt first, the whole conversation) and its tools
    assert all(m[0] == {"role": "system", "content": "SYS POLICY"} and tools == FakeTau2Env.TOOLS
               for m, tools in prompts)
    assert len(prompts[3][0]) == 2 + 2 * 3 and prompts[3][0][-1] == {"role": "user", "content": "thanks"}
    assert [st["valid"] for st in episode["steps"]] == [True, False, True, False] and episode["success"]
    assert [st["executed"] for st in episode["steps"]] == [True, True, True, False]
    assert episode["steps"][0]["action"] == '{"name": "Get_Order", "arguments": {"order_id": "#W1"}}'  # case kept
    # the failing call that ran is a triple (its error reply is a real transition); the unparsed reply is not
    tool, error, user = episode_triples(episode, history=5)
    assert (tool["next_kind"], error["next_kind"], user["next_kind"]) == ("tool", "tool", "user")
    assert error["next_state"] == "tool: Error: no such tool" and error["id"] == "retail/1#0#1"
    assert json.loads(tool["next_state"].removeprefix("tool: ")) == {"type": "object", "properties": {
        "order_id": {"type": "string"}, "items": {"type": "array", "items": {"type": "object", "properties": {
            "price": {"type": "number"}}}}}}
    assert tool["meta"]["raw_next_state"] == episode["steps"][0]["next_obs"] and user["next_state"] == "user: thanks"
    assert user["history"] == [{"obs": "user: where is my order?", "action": episode["steps"][0]["action"]},
                               {"obs": episode["steps"][0]["next_obs"], "action": episode["steps"][1]["action"]}]
    assert tool["meta"]["system_prompt"] == "SYS POLICY" and tool["meta"]["user_info"] == "name: Ann"


def test_val_split_is_random_over_triples_by_default_or_by_task():
    rows = [{"id": f"t{k}#0#{i}", "task_id": f"t{k}"} for k in range(4) for i in range(10)]
    train, val = collect.split_triples(rows, 0.1, seed=0)
    assert len(val) == 4 and len(train) == 36 and {r["id"] for r in train + val} == {r["id"] for r in rows}
    assert len({r["task_id"] for r in val}) > 1   # whole tasks would put 10 triples of one task there
    assert (train, val) == collect.split_triples(rows, 0.1, seed=0) != collect.split_triples(rows, 0.1, seed=1)
    train, val = collect.split_triples(rows, 0.25, seed=0, by="tasks")
    assert len(val) == 10 and len({r["task_id"] for r in val}) == 1
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in val}


def test_rollouts_split_across_user_simulators_in_blocks(tmp_path, monkeypatch):
    """Paper App. C.1: 3 rollouts with one user simulator + 3 with another, one collect run, unique ids."""
    made = []

    class Suite(FakeTau2Suite):
        task_ids = ["retail/1", "retail/2"]

    def make_suite(env, split, *, user_model, **kw):
        made.append(user_model)
        return Suite()
    monkeypatch.setattr(collect, "make_suite", make_suite)
    s = settings(tmp_path, env="tau2", rollouts=6, user_model="sim-a,litellm:sim-b", history=5)
    collect.main(s, act=lambda messages_list, infos: [reply("hi") for _ in infos])
    assert made == ["sim-a", "litellm:sim-b"]
    episodes = read_jsonl(Path(s.out_dir) / "episodes.jsonl")
    assert sorted((e["task_id"], e["rollout"], e["user_model"]) for e in episodes) == [
        (t, r, "sim-a" if r < 3 else "litellm:sim-b") for t in Suite.task_ids for r in range(6)]
    triples = read_jsonl(Path(s.out_dir) / "triples.jsonl")
    assert len({t["id"] for t in triples}) == len(triples) == 2 * 6 * 3   # 3 user replies per episode
    with pytest.raises(SystemExit, match="3 simulators for --rollouts 2"):
        collect.main(settings(tmp_path / "x", env="tau2", rollouts=2, user_model="a,b,c"))


def test_merge_keeps_one_row_per_pair_and_a_retry_replaces_a_failed_row(tmp_path):
    row = {"task_id": "a", "rollout": 0, "steps": [], "n_steps": 0, "success": False}
    (tmp_path / "episodes.jsonl").write_text(json.dumps({**row, "error": "boom"}) + "\n" + json.dumps(
        {**row, "task_id": "b"}) + "\n")
    (tmp_path / "episodes.rank1.jsonl").write_text(json.dumps({**row, "success": True}) + "\n" + '{"task_id": "c", "ro')
    merged = collect.merge_episodes(tmp_path)
    assert [(e["task_id"], e["success"], "error" in e) for e in merged] == [("a", True, False), ("b", False, False)]
    assert not list(tmp_path.glob("episodes.rank*")) and read_jsonl(tmp_path / "episodes.jsonl") == merged


# ---------------------------------------------------------------------------------------------------------
# Real envs

def test_tiny_model_on_textworld_express_writes_valid_files_reproducibly(tmp_path):
    s = settings(tmp_path, env="twx", split="train", n_tasks=2, rollouts=2, max_env_steps=2)
    collect.main(s)
    episodes, _ = check_outputs(s)
    assert len(episodes) == 4 and {e["task_type"] for e in episodes} <= {"cookingworld", "twc", "coin"}
    again = settings(tmp_path, env="twx", split="train", n_tasks=2, rollouts=2, max_env_steps=2,
                     out_dir=str(tmp_path / "again"))
    collect.main(again)
    assert read_jsonl(Path(again.out_dir) / "episodes.jsonl") == episodes  # same seed, same episodes


def test_tiny_model_on_alfworld_writes_valid_files(tmp_path):
    s = settings(tmp_path, env="alfworld", split="train", max_env_steps=2)
    collect.main(s)
    episodes, _ = check_outputs(s)
    assert len(episodes) == 2 and all(e["task_type"] and e["instruction"] for e in episodes)
    stats = json.loads((Path(s.out_dir) / "stats.json").read_text())
    assert stats["this_run"]["episodes"] == 2 and stats["this_run"]["env_steps_per_s"] > 0


def test_triples_line_up_with_episodes_and_invalid_steps_are_dropped(tmp_path):
    s = settings(tmp_path, env="alfworld", split="valid_seen", max_env_steps=8, rollouts=2, history=2, val_split="tasks")
    collect.main(s, act=mixed_actor())
    episodes, triples = check_outputs(s)
    invalid = [st for e in episodes for st in e["steps"] if not st["valid"]]
    assert invalid and triples and len(triples) + len(invalid) == sum(e["n_steps"] for e in episodes)
    assert all(st["next_obs"] == "Nothing happens." for st in invalid)  # the env still answered as ALFWorld does
    assert {t["meta"]["task_type"] for t in triples} <= {"look_at_obj_in_light", "pick_two_obj_and_place"}
    assert triples == [t for e in episodes for t in episode_triples(e, s.history)]


@pytest.mark.parametrize("env,split,n_tasks", [("alfworld", "train", None), ("alfworld", "valid_unseen", None),
                                               ("twx", "dev", 6)])
def test_expert_policy_wins_every_episode_without_a_model(tmp_path, env, split, n_tasks):
    """--policy expert plays the env's gold actions (ALFWorld: the walkthrough) on the real games; no model loads."""
    s = settings(tmp_path, env=env, split=split, n_tasks=n_tasks, max_env_steps=50, batch_size=8, policy="expert",
                 model="no-such-model")
    stats = collect.main(s)
    episodes, triples = check_outputs(s)
    assert stats["success_rate"] == 1.0 and stats["invalid_action_rate"] == 0.0
    assert len(triples) == sum(e["n_steps"] for e in episodes) and all(e["model"] == "expert" for e in episodes)
    assert all(st["response"] == f"<think> </think>\n<action> {st['action']} </action>"
               for e in episodes for st in e["steps"])


def test_expert_without_gold_gives_up_and_on_tau2_ends_the_conversation():
    infos = [{"gold": "go to desk 1"}, {"gold": None}]
    text_game = [x.text for x in collect.expert_actor("alfworld")(["m", "m"], infos)]
    assert [parse_action(x, ["go to desk 1"]) for x in text_game] == [("go to desk 1", True), ("", False)]
    tau2 = [parse_action(x.text, None)[0] for x in collect.expert_actor("tau2")(["m", "m"], infos)]
    assert tau2 == ["go to desk 1", '{"name": "done", "arguments": {}}']


# ---------------------------------------------------------------------------------------------------------
# Branching: alternative actions from every expert state (IWM / SR data)

def replay(suite, task_id: str, actions: list[str]) -> str:
    """What a fresh env answers after these actions: the independent check of an alternative's next state."""
    env = suite.make()
    obs, _ = env.reset(task_id)
    for a in actions:
        obs = env.step(a)[0]
    env.close()
    return obs


@pytest.mark.parametrize("env,split,task_type,max_steps", [
    ("twx", "train", "cookingworld", 6),
    pytest.param("alfworld", "train", "pick_and_place_simple", 3, marks=pytest.mark.slow)])  # ~3 s a game load
def test_alternatives_are_real_transitions_from_the_expert_states(tmp_path, env, split, task_type, max_steps):
    from envs import make_env
    s = settings(tmp_path, env=env, split=split, task_type=task_type, n_tasks=2, max_env_steps=max_steps,
                 policy="expert", alternatives=2, model="no-such-model")
    stats = collect.main(s)
    episodes, own = check_outputs(s)
    out = Path(s.out_dir)
    alt = read_jsonl(out / "triples_alt.jsonl", required=TRIPLE_KEYS)
    own = {t["id"]: t for t in own}
    by_state = {}
    suite = make_env(env, split)
    for t in alt:
        state_id, _, j = t["id"].rpartition("#alt")
        by_state.setdefault(state_id, []).append(t)
        expert_step = own[state_id]
        e = next(e for e in episodes if e["task_id"] == t["task_id"])
        # the expert's state, history and instruction; another admissible action; the env's answer to it there
        for key in ("task_id", "instruction", "history", "state", "env", "next_kind"):
            assert t[key] == expert_step[key], key
        assert t["action"] != expert_step["action"] and t["action"] in t["meta"]["admissible"]
        assert t["meta"]["expert_action"] == expert_step["action"]
        assert t["meta"]["expert_next_state"] == expert_step["next_state"]
        prefix = [st["action"] for st in e["steps"][:t["meta"]["t"]]]
        assert t["next_state"] == replay(suite, t["task_id"], prefix + [t["action"]])
    # K distinct alternatives from every expert state
    assert set(by_state) == set(own)
    for state_id, rows in by_state.items():
        assert len(rows) == 2 and len({r["action"] for r in rows}) == 2
    branching = stats["branching"]
    assert branching["alternatives"] == branching["triples_alt"] == len(alt) and branching["diverged"] == 0
    assert branching["replayed_steps"] == sum(2 * t for e in episodes for t in range(e["n_steps"]))
    # a rerun finds every episode branched and plays nothing
    assert len(read_jsonl(out / "branches.jsonl")) == len(episodes)
    collect.main(s)
    assert read_jsonl(out / "triples_alt.jsonl") == alt


class DriftingEnv(FakeEnv):
    """A game that is not the same game when loaded again: its first observation changes with every reset."""
    loads = 0

    def reset(self, task_id):
        DriftingEnv.loads += 1
        obs, info = super().reset(task_id)
        return f"{obs} (load {DriftingEnv.loads})", info


class DriftingSuite(FakeSuite):
    task_ids = ["n3"]

    def make(self):
        return DriftingEnv()


def test_a_replay_that_does_not_reach_the_same_state_is_dropped(tmp_path, monkeypatch):
    monkeypatch.setattr(collect, "make_suite", lambda *a, **kw: DriftingSuite())
    s = settings(tmp_path, env="twx", split="train", policy="expert", alternatives=1, model="no-such-model")
    stats = collect.main(s)
    assert stats["success_rate"] == 1.0 and stats["branching"]["diverged"] == 3
    assert read_jsonl(Path(s.out_dir) / "triples_alt.jsonl") == []


def test_model_alternatives_are_distinct_admissible_and_not_the_expert_action(tmp_path, monkeypatch):
    """--alternative-source model: the model's samples from the agent's prompt; a repeat, the expert's own action
    and a non-admissible action are not played."""
    asked = []

    def model(messages_list, infos):
        asked.append(messages_list)
        k = len(messages_list) // 3
        return [reply(a) for _ in range(k) for a in ("go", "wait", "fly")]  # go = the expert's (gold) action

    monkeypatch.setattr(FakeSuite, "task_ids", ["n2"])
    monkeypatch.setattr(collect, "make_suite", lambda *a, **kw: FakeSuite())
    s = settings(tmp_path, env="twx", split="train", policy="expert", alternatives=3, alternative_source="model")
    collect.main(s, act=model)
    alt = read_jsonl(Path(s.out_dir) / "triples_alt.jsonl")
    assert [(t["id"], t["action"]) for t in alt] == [("n2#0#0#alt0", "wait"), ("n2#0#1#alt0", "wait")]
    # the prompt the model saw is the agent's prompt at that state
    assert len(asked) == 1 and "n2 start" in asked[0][0][0]["content"] and "n2 t1" in asked[0][3][0]["content"]


def test_a_killed_run_resumes_without_duplicates(tmp_path):
    s = settings(tmp_path, env="twx", split="train", n_tasks=4, rollouts=2, max_env_steps=4, batch_size=3)
    calls = {"n": 0}
    inner = mixed_actor(1)

    def dies(messages_list, infos):  # Ctrl-C in the middle of generation, after some episodes finished
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return inner(messages_list, infos)

    with pytest.raises(KeyboardInterrupt):
        collect.main(s, act=dies)
    path = Path(s.out_dir) / "episodes.jsonl"
    saved = read_jsonl(path)
    assert 0 < len(saved) < 8
    with open(path, "a") as f:  # and the kill tore the line being written
        f.write('{"env": "twx", "split": "train", "task_id": "coin-se')
    stats = collect.main(s, act=mixed_actor(2))
    episodes, _ = check_outputs(s)
    assert len(episodes) == 8 and stats["this_run"]["episodes"] == 8 - len(saved)
    assert all(e in episodes for e in saved)  # finished episodes are kept as they were
    assert collect.main(s, act=mixed_actor(3))["this_run"]["episodes"] == 0  # nothing left to play
    assert read_jsonl(path) == episodes


def test_bad_settings_and_a_rerun_with_other_settings_are_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--rollouts must be >= 1"):
        collect.main(settings(tmp_path, rollouts=0))
    with pytest.raises(SystemExit, match="--explore with --policy expert"):
        collect.main(settings(tmp_path, policy="expert", explore=0.5))
    with pytest.raises(SystemExit, match="--alternatives on τ²"):
        collect.main(settings(tmp_path, env="tau2", policy="expert", alternatives=2))
    save_config(settings(tmp_path, max_env_steps=5), tmp_path / "out")
    with pytest.raises(SystemExit, match="--max-env-steps 5 -> 3"):
        collect.main(settings(tmp_path, env="twx", split="train"))


def test_explore_asks_the_model_only_for_steps_that_do_not_explore(tmp_path):
    asked = []

    def model(messages_list, infos):
        asked.append(len(messages_list))
        return [reply("look") for _ in messages_list]

    infos = [{"admissible": ["look", "inventory"]}] * 40
    half = collect.explore_actor(model, 0.5, random.Random(0))(["m"] * 40, infos)
    assert len(half) == 40 and 0 < asked[0] < 40
    assert sum(x.text.startswith("<think>explore") for x in half) == 40 - asked[0]
    asked.clear()
    everything = collect.explore_actor(model, 1.0, random.Random(0))(["m"] * 40, infos)
    assert not asked and all(x.text.startswith("<think>explore") for x in everything)
    # with --explore 1 on a text game collect.py plays without loading any model
    s = settings(tmp_path, env="alfworld", split="train", max_env_steps=2, model="no-such-model", explore=1.0)
    collect.main(s)
    episodes, triples = check_outputs(s)
    assert all(st["valid"] for e in episodes for st in e["steps"]) and len(triples) == 4
