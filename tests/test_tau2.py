"""τ² env: official splits, scripted episodes scored by the official evaluator, hostile actions, schema masking,
and the official user simulator driven by a plain local callable (no network anywhere)."""
import json

import pytest

from envs.tau2 import make_suite, mask_tool_reply

RETAIL_COMM = "retail/43"  # 5 required calls + 7 facts the agent must communicate
RETAIL_GOLD_ERROR = "retail/13"  # one required call is answered with an error, as τ² intends
AIRLINE = "airline/3"
TELECOM_MIXED = "telecom/[mms_issue]bad_network_preference|user_abroad_roaming_disabled_off[PERSONA:None]"
TELECOM_AGENT_FIRST = "telecom/[mobile_data_issue]data_usage_exceeded|user_abroad_roaming_enabled_off[PERSONA:Easy]"
TELECOM_TRANSFER = "telecom/[service_issue]lock_sim_card_pin|overdue_bill_suspension[PERSONA:Easy]"  # ACTION basis


@pytest.fixture(scope="module")
def suite():
    return make_suite("train", max_steps=200)


def call(name, arguments):
    return json.dumps({"name": name, "arguments": arguments})


def scripted_user(task, judge=False, act=True):
    """A user_llm that opens, then per agent message performs the next run of the task's required user calls
    (telecom: on its phone, one call per turn) and says "Done.", and stops when nothing is left.
    The simulator sees roles flipped: the agent speaks as "user", the simulated user as "assistant"."""
    chunks, pending, prev = [], [], None
    for a in task.evaluation_criteria.actions or []:
        if a.requestor == "user" and act:
            if prev != "user":
                chunks.append([])
            chunks[-1].append(a)
        prev = a.requestor
    seen = []

    def user_llm(messages):
        seen.append(messages)
        if judge and "expectedOutcome" in messages[0]["content"]:  # the NL-assertion judge, same local model
            return json.dumps({"results": [{"expectedOutcome": x, "reasoning": "ok", "metExpectation": True}
                                           for x in task.evaluation_criteria.nl_assertions]})
        if not any(m["role"] == "assistant" for m in messages):
            return "Hi, I need some help."
        if messages[-1]["role"] == "user":
            if not chunks:
                return "###STOP###"
            pending[:] = chunks.pop(0)
        if pending:
            a = pending.pop(0)
            return call(a.name, a.arguments)
        return "Done."

    user_llm.seen = seen
    return user_llm


def play(suite, task_id, replace=None, skip_user=False, judge=False, **kw):
    """The scripted agent: replays the task's required agent calls in order, asks the user whenever the user's
    calls come next, then sends the facts to communicate. replace={name: action} swaps a required call."""
    task = suite.tasks[task_id]
    user = scripted_user(task, judge, act=not skip_user)
    env = make_suite("train", domain=task_id.split("/")[0], user_llm=user, max_steps=200, **kw).make()
    obs, info = env.reset(task_id)
    steps, prev = [], None
    for a in task.evaluation_criteria.actions or []:
        if a.requestor == "user":
            if prev != "user" and not skip_user:
                steps.append(env.step("Please do the next step on your phone."))
        else:
            steps.append(env.step((replace or {}).get(a.name, call(a.name, a.arguments))))
        prev = a.requestor
    steps.append(env.step("Thank you. " + " ; ".join(task.evaluation_criteria.communicate_info or [])))
    return obs, info, steps, user


@pytest.mark.parametrize("task_id", [RETAIL_COMM, RETAIL_GOLD_ERROR, AIRLINE, TELECOM_MIXED, TELECOM_AGENT_FIRST,
                                     TELECOM_TRANSFER])
def test_scripted_replay_wins(suite, task_id):
    obs, info, steps, _ = play(suite, task_id)
    assert obs.startswith("assistant: Hi! How can I help you today?\nuser: Hi, I need some help.")
    *middle, (obs, reward, done, info) = steps
    assert not any(d for _, _, d, _ in middle)
    assert done and reward == 1.0 and info["won"] and info["termination"] == "user_stop"
    basis = suite.tasks[task_id].evaluation_criteria.reward_basis
    assert info["checks"] == sorted(b.value for b in basis) and info["nl_checks"] is False
    assert all(v == 1.0 for v in info["reward_info"]["reward_breakdown"].values())
    kinds = [i["next_kind"] for _, _, _, i in steps]
    required = suite.tasks[task_id].evaluation_criteria.actions
    assert kinds.count("tool") == sum(a.requestor == "assistant" for a in required)
    for o, _, _, i in steps:  # obs = "kind: raw reply"; collect.py reads next_kind, tool_name and reply
        assert o == f"{i['next_kind']}: {i['reply']}" and (i["tool_name"] is None) == (i["next_kind"] == "user")


def test_wrong_action_scores_zero(suite):
    # retail: the address change replaced by a valid but wrong call -> the DB differs from the gold DB
    _, _, steps, _ = play(suite, RETAIL_COMM, replace={"modify_user_address": call(
        "transfer_to_human_agents", {"summary": "the user wants a new address"})})
    _, reward, done, info = steps[-1]
    assert done and reward == 0.0 and not info["won"] and info["reward_info"]["reward_breakdown"]["DB"] == 0.0
    # telecom: the agent never asks the user to fix the phone -> the env assertions fail
    _, _, steps, _ = play(suite, TELECOM_MIXED, skip_user=True)
    assert steps[-1][1] == 0.0 and steps[-1][3]["reward_info"]["reward_breakdown"]["ENV_ASSERTION"] == 0.0
    # telecom, ACTION basis: a lookup instead of the required transfer
    _, _, steps, _ = play(suite, TELECOM_TRANSFER, replace={"transfer_to_human_agents": call(
        "get_customer_by_phone", {"phone_number": "555-123-2002"})})
    assert steps[-1][1] == 0.0 and steps[-1][3]["reward_info"]["reward_breakdown"]["ACTION"] == 0.0


def test_hostile_actions_are_invalid_never_raise():
    deep = "{" + '"a": {' * 40 + "}" * 40 + "}"
    hostile = [
        '{"name": "get_user_details", "arguments": {"user_id": ',  # truncated JSON
        "{not json at all",
        '{"name": "get_user_details", "arguments": "yusuf_rossi_9620"}',  # arguments not an object
        '{"name": 42, "arguments": {}}',
        '{"name": "get_user_details", "arguments": {}, "requestor": "user"}',  # tries to act as the user
        '{"tool": "get_user_details"}',
        call("no_such_tool", {}),
        call("get_user_details", {"user_id": "x" * 1_000_000}),  # huge argument
        call("get_user_details", {"user_id": ["a", {"b": None}]}),  # wrong type
        call("get_order_details", {"order_id": 12345}),  # wrong type
        call("get_user_details", {"user_id": "a", "requestor": "user", "tool_name": "x"}),  # clashing names
        call("get_user_details", {}),  # missing argument
        call("calculate", {"expression": "9**9**9**9"}),  # would never return
        call("calculate", {"expression": 7}),
        '{"name": "calculate", "arguments": {"expression": ' + "1" * 5000 + "}}",  # int too long to parse
        '{"name": "get_user_details", "arguments": ' + deep + "}",  # nested too deep
        "{" * 100_000,  # JSON recursion
        "   ",
        "",
    ]
    executed = set(hostile[6:12]) | {call("calculate", {"expression": 7})}
    env = make_suite("train", domain="retail", user_llm=lambda m: "Hello.", max_steps=1000, max_errors=1000).make()
    env.reset("retail/0")
    for action in hostile:
        obs, reward, done, info = env.step(action)
        assert not info["valid"] and not done and reward == 0.0, action[:80]
        assert info["next_kind"] == "tool" and obs.startswith("tool: Error"), (action[:80], obs[:200])
        # unparsable (or guarded) calls are rejected unrun; τ² runs an unknown tool or bad arguments and answers
        assert info["executed"] == (action in executed), action[:80]
    obs, reward, done, info = env.step("[1, 2]")  # not a call: a (strange) message to the user
    assert info["valid"] and obs == "user: Hello."
    obs, reward, done, info = env.step("###STOP###")  # the agent ends; the official evaluator still scores it
    assert done and reward == 0.0 and info["termination"] == "agent_stop" and info["checks"] == ["COMMUNICATE", "DB"]
    assert env.step("anything")[2]  # acting after the end is a no-op, not a crash


def test_agent_stop_tool_ends_and_scores(suite):
    """τ²'s gym `done` tool: with a user that never stops (a small local model), the agent's stop gets scored."""
    assert len(suite.tasks["retail/73"].evaluation_criteria.actions) == 1
    env = make_suite("train", domain="retail", user_llm=lambda m: "Hello.").make()
    obs, info = env.reset("retail/73")
    assert any(t["function"]["name"] == "done" for t in info["tools"])
    obs, reward, done, info = env.step(info["gold"])  # the required call, as the env's gold hint gives it
    assert info["valid"] and not done and info["gold"] is None
    obs, reward, done, info = env.step(call("done", {}))
    assert done and reward == 1.0 and info["valid"] and info["termination"] == "agent_stop" and obs == ""


def test_gold_hint_moves_past_a_required_call_answered_with_an_error():
    """Some tasks require a call that τ² answers with an error. The expert (collect.py --policy expert) follows the
    hint: it must move on once the call ran, not repeat it until the episode's error limit."""
    task = make_suite("train", domain="retail").tasks[RETAIL_GOLD_ERROR]
    required = [a for a in task.evaluation_criteria.actions if a.requestor == "assistant"]
    env = make_suite("train", domain="retail", user_llm=lambda m: "Hello.").make()
    obs, info = env.reset(RETAIL_GOLD_ERROR)
    played, errors = [], 0
    while info["gold"] is not None and len(played) <= len(required):
        played.append(info["gold"])
        obs, reward, done, info = env.step(info["gold"])
        errors += obs.startswith("tool: Error")
        assert not done
    assert played == [call(a.name, a.arguments) for a in required] and errors == 1
    obs, reward, done, info = env.step(call("done", {}))
    assert done and info["termination"] == "agent_stop"


def test_episode_limits():
    env = make_suite("train", domain="retail", user_llm=lambda m: "Hello.", max_steps=7).make()
    env.reset("retail/0")  # 1 step used: the user's opening (τ² does not count its own greeting)
    results = [env.step(call("get_user_details", {"user_id": "yusuf_rossi_9620"})) for _ in range(3)]
    assert [r[2] for r in results] == [False, False, True] and results[-1][3]["termination"] == "max_steps"
    env = make_suite("train", domain="retail", user_llm=lambda m: "Hello.", max_steps=100).make()
    env.reset("retail/0")
    results = [env.step("{broken") for _ in range(10)]  # τ²'s default: 10 failed calls end the episode
    assert [r[2] for r in results] == [False] * 9 + [True]
    assert results[-1][3]["termination"] == "too_many_errors" and results[-1][1] == 0.0


def test_user_llm_drives_official_user_simulator(suite):
    from tau2.user.user_simulator import get_global_user_sim_guidelines
    _, info, steps, user = play(suite, TELECOM_MIXED)
    task = suite.tasks[TELECOM_MIXED]
    system = user.seen[0][0]
    assert system["role"] == "system" and get_global_user_sim_guidelines(use_tools=True) in system["content"]
    assert task.user_scenario.instructions.reason_for_call in system["content"]
    assert "<tools>" in system["content"] and '"name": "toggle_roaming"' in system["content"]
    assert any(m["role"] == "tool" for m in user.seen[-1])  # the user's own calls ran on its phone
    assert sum(i.get("user_tool_calls", 0) for *_, i in steps) == 2
    # the agent side: τ²'s prompt, tool schemas, and only what the simulator knows about itself
    assert "<policy>" in info["system_prompt"] and '"name": "get_customer_by_phone"' in info["system_prompt"]
    assert info["user_info"] == task.user_scenario.instructions.known_info
    assert task.user_scenario.instructions.reason_for_call not in info["user_info"]
    assert info["task_type"] == "telecom" and info["admissible"] is None and info["tools"]


def test_user_that_says_nothing_ends_the_episode():
    env = make_suite("train", domain="retail", user_llm=lambda m: "").make()
    _, info = env.reset("retail/0")  # τ² rejects the empty user message: a user error, not a crash
    assert info["done"]
    _, reward, done, info = env.step("Hello?")
    assert done and reward == 0.0 and info["termination"] == "user_error" and not info["valid"]


def test_nl_checks_use_the_local_judge(suite):
    _, _, steps, user = play(suite, AIRLINE, judge=True, nl_checks=True)
    _, reward, done, info = steps[-1]
    assert done and reward == 1.0 and info["nl_checks"] and info["reward_info"]["nl_assertions"][0]["met"]
    assert any("expectedOutcome" in m[0]["content"] for m in user.seen)


def test_splits_are_the_official_ones():
    train, test = make_suite("train"), make_suite("test")
    for split, sizes in ((train, (30, 74, 74)), (test, (20, 40, 40))):
        counts = [sum(t.startswith(d + "/") for t in split.task_ids) for d in ("airline", "retail", "telecom")]
        assert tuple(counts) == sizes
    assert not set(train.task_ids) & set(test.task_ids)
    assert make_suite("test", domain="retail").task_ids == [t for t in test.task_ids if t.startswith("retail/")]
    with pytest.raises(ValueError, match="split"):
        make_suite("dev")
    with pytest.raises(ValueError, match="domain"):
        make_suite("train", domain="banking")
    with pytest.raises(ValueError, match="user simulator"):
        make_suite("train").make()


def test_mask_tool_reply():
    reply = json.dumps({"customer_id": "abc", "n": 2, "ok": True, "price": 9.5, "note": None,
                        "orders": [{"id": "#W1", "items": [1, 2]}, {"id": "#W2", "items": []}], "tags": [],
                        "address": {"city": "Chicago", "zip": "60621"}})
    assert json.loads(mask_tool_reply(reply)) == {"type": "object", "properties": {
        "customer_id": {"type": "string"}, "n": {"type": "integer"}, "ok": {"type": "boolean"},
        "price": {"type": "number"}, "note": {"type": "null"},
        "orders": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "items": {"type": "array", "items": {"type": "integer"}}}}},
        "tags": {"type": "array", "items": {}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}}}}}
    assert mask_tool_reply('{"customer_id": "abc", "n": 2}') == \
        '{"type": "object", "properties": {"customer_id": {"type": "string"}, "n": {"type": "integer"}}}'
    assert mask_tool_reply("Error: User not found") == "Error: User not found"
    assert mask_tool_reply("1024.0") == '{"type": "number"}'
    assert mask_tool_reply('"Transfer successful"') == '{"type": "string"}'


# ---------------------------------------------------------------------------------------------------------------
# The pipeline on τ²: collect -> filter -> train_rwml --task wm -> evaluate (wm, agent), tiny models throughout

def gold_actor(messages_list, infos):
    """Replays the env's next required call (info["gold"]) as a <tool_call> but every third turn (and once the
    calls run out) writes to the user, so an episode holds both next kinds. A reset info (it has "instruction")
    restarts the turn count; batch_size 1 keeps one episode live at a time."""
    from common import Sample
    out = []
    for info in infos:
        gold_actor.turn = 0 if "instruction" in info else gold_actor.turn + 1
        reply = f"<tool_call>{info['gold']}</tool_call>" if info["gold"] and gold_actor.turn % 3 != 2 else \
            "Could you confirm your zip code?"
        out.append(Sample([], [], f"<think>scripted</think>{reply}", [], True))
    return out


@pytest.mark.slow  # a tiny user LLM on τ²'s ~2k-token user prompts, tiny WM/agent on 5-8k-token prompts: ~60 s
def test_collect_filter_train_evaluate_on_tau2(tmp_path):
    import collect
    import evaluate
    import filter as wm_filter
    import train_rwml
    from common import read_jsonl

    s = collect.Settings(env="tau2", split="train", task_type="retail", n_tasks=2, rollouts=1, max_env_steps=5,
                         history=5, model="tiny", user_model="tiny", batch_size=1, val_frac=0.5,
                         out_dir=str(tmp_path / "collect"))
    stats = collect.main(s, act=gold_actor)
    episodes = read_jsonl(tmp_path / "collect" / "episodes.jsonl")
    triples = {t["id"]: t for t in read_jsonl(tmp_path / "collect" / "triples.jsonl")}
    assert len(episodes) == 2 and stats["errors"] == 0
    for e in episodes:
        assert e["task_type"] == "retail" and "<policy>" in e["system_prompt"] and e["user_info"]
        for t, step in enumerate(e["steps"]):
            triple = triples.pop(f"{e['task_id']}#0#{t}", None)
            if not (step["valid"] or step["executed"]) or not step["next_obs"]:  # nothing to predict: no triple
                assert triple is None
                continue
            assert triple["next_kind"] == step["next_kind"] == step["next_obs"].split(": ", 1)[0]
            assert triple["state"] == step["obs"] and triple["action"] == step["action"]
            assert triple["history"] == [{"obs": p["obs"], "action": p["action"]} for p in e["steps"][max(0, t - 5):t]]
            reply, status = triple["next_state"].rsplit("\nTask status: ", 1)
            assert status == ("completed" if step["task_status"] == "completed" else "ongoing")
            if step["next_kind"] == "tool":  # masked to the schema; the raw reply stays in meta
                assert triple["meta"]["raw_next_state"] == step["next_obs"]
                assert json.loads(reply.removeprefix("tool: ")) == json.loads(mask_tool_reply(
                    step["next_obs"].removeprefix("tool: ")))
            else:
                assert reply == step["next_obs"] and "raw_next_state" not in triple["meta"]
            assert triple["meta"]["system_prompt"] == e["system_prompt"]
            assert triple["meta"]["user_info"] == e["user_info"]
    assert not triples
    kinds = {t["next_kind"] for t in read_jsonl(tmp_path / "collect" / "triples.jsonl")}
    assert kinds == {"tool", "user"}

    # the filter (no SFT, K = 2) and one RWML step: τ² prompts are 5-8k tokens, so the prompt caps go up
    data = tmp_path / "collect"
    summary = wm_filter.main(["--triples", str(data / "triples_train.jsonl"), "--val-triples",
                              str(data / "triples_val.jsonl"), "--model", "tiny", "--epochs", "0", "--k", "2",
                              "--max-new-tokens", "8", "--truncate-prompt-tokens", "10000", "--reward-max-tokens", "512",
                              "--out-dir", str(tmp_path / "filter")])
    assert summary["triples"] == len(read_jsonl(data / "triples_train.jsonl")) and summary["tau_d_user"] == 0.15
    assert set(summary["by_next_kind"]) <= {"tool", "user"}
    ckpt = train_rwml.main(["--task", "wm", "--data", str(tmp_path / "filter" / "filtered.jsonl"), "--model", "tiny",
                            "--max-steps", "1", "--prompts-per-step", "1", "--group-size", "2", "--gen-chunk", "1",
                            "--max-new-tokens", "8", "--max-prompt-tokens", "10000", "--reward-max-tokens", "512",
                            "--out-dir", str(tmp_path / "rwml")])
    rows = read_jsonl(tmp_path / "rwml" / "metrics.jsonl")
    assert ckpt is not None and any(r.get("step") == 1 for r in rows)

    # evaluate the trained world model on the held-out triples and the tiny model as a τ² agent
    wm = evaluate.main(["--what", "wm", "--model", str(ckpt), "--triples", str(data / "triples_val.jsonl"),
                        "--max-new-tokens", "8", "--max-state-tokens", "512", "--out-dir", str(tmp_path / "eval_wm")])
    assert wm["n"] == len(read_jsonl(data / "triples_val.jsonl")) and set(wm["by_next_kind"]) <= {"tool", "user"}
    agent = evaluate.main(["--what", "agent", "--model", "tiny", "--env", "tau2", "--split", "test",
                           "--task-type", "airline", "--n-tasks", "1", "--max-env-steps", "2", "--max-new-tokens", "8",
                           "--history", "5", "--user-model", "tiny", "--greedy",
                           "--out-dir", str(tmp_path / "eval_agent")])
    assert agent["n_episodes"] == 1 and agent["trials"] == 1 and list(agent["by_task_type"]) == ["airline"]
    assert agent["by_task_type"]["airline"]["n_tasks"] == 1 and agent["success"] == 0.0


def test_invalid_tool_call_rate_counts_calls_only():
    from evaluate import agent_results

    def step(kind, action, valid):
        return {"next_kind": kind, "action": action, "valid": valid, "next_obs": "", "obs": ""}

    episodes = [{"task_id": "retail/1", "task_type": "retail", "success": True, "steps": [
                    step("tool", call("get_user_details", {}), False), step("tool", call("a", {}), True),
                    step("user", "hello", True), step("tool", "", False)]},  # "" = no <action>: format error
                {"task_id": "airline/2", "task_type": "airline", "success": False, "steps": [
                    step("tool", "{broken", False)]}]
    r = agent_results(episodes)
    assert (r["n_tool_calls"], r["invalid_tool_call_rate"]) == (3, 2 / 3) and r["invalid_rate"] == 3 / 5
    assert r["by_task_type"]["retail"]["invalid_tool_call_rate"] == 0.5
    assert r["by_task_type"]["airline"]["invalid_tool_call_rate"] == 1.0 and r["n_tasks"] == 2


def test_make_suite_routes_the_user_simulator(monkeypatch):
    import rollout
    suite = rollout.make_suite("tau2", "test", task_type="airline", user_model="litellm:gpt-4.1")
    assert suite.user_model == "gpt-4.1" and suite.user_llm is None and len(suite.task_ids) == 20
    with pytest.raises(SystemExit, match="--n-workers 0"):
        rollout.make_suite("tau2", "test", user_model="tiny", n_workers=2)
    loaded = []
    monkeypatch.setattr(rollout, "load_model", lambda name, device=None: loaded.append(name) or (None, None))
    assert rollout.make_suite("tau2", "test", task_type="retail").user_llm is not None
    assert loaded == ["smollm2-135m"]  # the offline default


# ---------------------------------------------------------------------------------------------------------------
# The policy plays τ² as the paper does: τ²'s own agent prompt, the whole conversation as chat messages, the tools
# through the chat template, replies in the template's tool-call format

# A tool-rendering chat template written for these tests, in the Hermes convention of Qwen's templates: the tools
# in the system turn, past calls as <tool_call> blocks, tool replies as <tool_response> user turns.
TOOLS_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ 'user' if m.role == 'tool' else m.role }}\n"
    "{%- if m.role == 'system' %}{{ m.content }}{% if tools %}\nTOOLS:{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}{% endif %}"
    "{%- elif m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ {'name': c.function.name, 'arguments': "
    "c.function.arguments} | tojson }}</tool_call>{% endfor %}"
    "{%- elif m.role == 'tool' %}<tool_response>{{ m.content }}</tool_response>"
    "{%- else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def played_episode():
    """retail/0 with a user that always says the same: a call in the template's format (the required lookup), a
    malformed call, a message, then τ²'s `done` call; returns (episode, [(prompt, tools, the env's gold call)] as
    the agent saw them at each turn)."""
    from common import Sample
    from rollout import run_episodes
    suite = make_suite("train", domain="retail", user_llm=lambda m: "I want to return my order.")
    seen = []

    def act(messages_list, infos):
        (messages,), (info,) = messages_list, infos
        seen.append((messages, info["tools"], info["gold"]))
        reply = [f"<think>find the user</think>\n<tool_call>\n{info['gold']}\n</tool_call>",
                 '<tool_call>{"name": "get_user_details", "arguments": {"user_id": </tool_call>',
                 "<think>ask</think>Could you give me your order id?",
                 '<tool_call>{"name": "done", "arguments": {}}</tool_call>'][len(seen) - 1]
        return [Sample([], [], reply, [], True)]
    (episode,) = run_episodes(act, suite, [("retail/0", 0)], env="tau2", split="train", max_env_steps=10)
    return episode, seen


def test_tau2_episode_with_template_tool_calls():
    from tau2.agent.llm_agent import AGENT_INSTRUCTION
    from tau2.registry import registry
    episode, seen = played_episode()
    gold = json.loads(seen[0][2])
    call, bad, message, done = episode["steps"]
    # the call in <tool_call> tags is τ²'s call: it ran and was the required one
    assert json.loads(call["action"]) == gold and call["valid"] and call["executed"]
    assert call["next_kind"] == "tool" and call["next_obs"] == "tool: yusuf_rossi_9620"
    # a malformed call is an invalid action the env answered with its error, not a crash
    assert not bad["valid"] and not bad["executed"] and bad["next_obs"].startswith("tool: Error: the tool call is")
    assert message["action"] == "Could you give me your order id?" and message["valid"]  # the reasoning is dropped
    assert message["next_obs"] == "user: I want to return my order."
    assert done["done"] and episode["n_steps"] == 4
    # the prompt: τ²'s system prompt (its agent instruction and the domain policy), the whole conversation, the tools
    policy = registry.get_env_constructor("retail")().get_policy()
    messages, tools, _ = seen[-1]
    assert messages[0]["role"] == "system" and AGENT_INSTRUCTION in messages[0]["content"]
    assert f"<policy>\n{policy}\n</policy>" in messages[0]["content"]
    assert messages[1:3] == [{"role": "assistant", "content": "Hi! How can I help you today?"},
                             {"role": "user", "content": "I want to return my order."}]
    assert messages[3]["tool_calls"][0]["function"] == {"name": gold["name"], "arguments": gold["arguments"]}
    assert messages[4] == {"role": "tool", "tool_call_id": messages[3]["tool_calls"][0]["id"],
                           "name": gold["name"], "content": "yusuf_rossi_9620"}
    assert messages[5]["role"] == "assistant" and messages[6]["content"].startswith("Error: the tool call is")
    assert messages[7:] == [{"role": "assistant", "content": "Could you give me your order id?"},
                            {"role": "user", "content": "I want to return my order."}]
    names = [t["function"]["name"] for t in tools]
    assert "find_user_id_by_name_zip" in names and "done" in names and all(t["type"] == "function" for t in tools)
    # the triples keep the env's action (the call JSON), the world model's prompt shows the tools as text
    from rollout import episode_triples
    triples = episode_triples(episode, history=5)
    assert [t["action"] for t in triples] == [call["action"], message["action"]]  # the malformed call: no triple
    assert '"name": "find_user_id_by_name_zip"' in triples[0]["meta"]["system_prompt"]


def test_tools_reach_the_model_through_the_chat_template(monkeypatch):
    import rollout
    from common import chat_ids, load_tokenizer, template_renders_tools
    _, seen = played_episode()
    messages, tools, _ = seen[-1]
    tok = load_tokenizer("smollm2-135m")
    # SmolLM2's template ignores tools=: they are written into the system turn, past calls as <tool_call> blocks
    assert not template_renders_tools(tok)
    text = tok.decode(chat_ids(tok, messages, tools))
    assert "<policy>" in text and "To call a tool, reply with only <tool_call>" in text
    assert json.dumps(tools[0]) in text and '<tool_call>{"name": "find_user_id_by_name_zip"' in text
    assert "<tool_response>\nyusuf_rossi_9620\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    # a template that renders tools gets them through tools=, and renders the past calls itself
    tok.chat_template = TOOLS_TEMPLATE
    assert template_renders_tools(tok)
    text = tok.decode(chat_ids(tok, messages, tools))
    listed = text.split("TOOLS:", 1)[1].split("<|im_end|>", 1)[0]
    assert all(f'"{t["function"]["name"]}"' in listed for t in tools) and "To call a tool, reply with only" not in text
    assert '<tool_call>{"name": "find_user_id_by_name_zip"' in text and "<tool_response>yusuf_rossi_9620<" in text
    # the actor hands each episode's tools to the template
    got = []
    monkeypatch.setattr(rollout, "generate", lambda model, tok, prompts, *a, **k: got.extend(prompts) or [])
    rollout.model_actor(None, tok, 1.0, 8)([messages], [{"tools": tools}])
    assert got == [chat_ids(tok, messages, tools)]
