"""The policy objectives beyond GRPO, each against a plain computation and in the trainer: GiGPO's step-level
advantages (--step-advantage gigpo) and ECHO's observation-token cross-entropy (--echo-coef)."""
import copy
import dataclasses
import math
from pathlib import Path

import helpers
import pytest
import torch
from helpers import metrics, one_thread  # noqa: F401 -- one_thread: autouse

import common
import rewards
import rollout
import train_rwml

ROOT = Path(__file__).resolve().parent.parent


def test_gigpo_step_advantages_by_hand():
    """Two groups of 3 episodes, γ = 0.5. Group 1: state A starts every episode (an anchor group of 3), B is
    reached twice (2), C and D once (singletons: 0). Group 2 also starts at A, but groups never mix: A is a
    singleton there, E an anchor group of 2."""
    states = [["A", "B"], ["A", "C"], ["A", "B", "D"], ["A"], ["E"], ["E"]]
    step_rewards = [[0, 10], [-1, 0], [0, -1, 8], [10], [0], [1]]
    # returns: [5, 10], [-1, 0], [1.5, 3, 8], [10], [0], [1]
    a_mean = (5 - 1 + 1.5) / 3
    adv, anchored = train_rwml.gigpo_step_advantages(states, step_rewards, 3, 0.5, "none")
    want = [[5 - a_mean, 3.5], [-1 - a_mean, 0.0], [1.5 - a_mean, -3.5, 0.0], [0.0], [-0.5], [0.5]]
    assert [[pytest.approx(v, abs=1e-12) for v in ep] for ep in want] == adv
    assert anchored == [[True, True], [True, False], [True, True, False], [False], [True], [True]]

    adv, _ = train_rwml.gigpo_step_advantages(states, step_rewards, 3, 0.5, "std")
    a_std = math.sqrt(((5 - a_mean) ** 2 + (-1 - a_mean) ** 2 + (1.5 - a_mean) ** 2) / 2)   # unbiased, as GRPO's
    b_std = math.sqrt(2 * 3.5 ** 2)
    want = [[(5 - a_mean) / a_std, 3.5 / b_std], [(-1 - a_mean) / a_std, 0.0],
            [(1.5 - a_mean) / a_std, -3.5 / b_std, 0.0], [0.0], [-0.5 / math.sqrt(0.5)], [0.5 / math.sqrt(0.5)]]
    assert [[pytest.approx(v, rel=1e-5, abs=1e-12) for v in ep] for ep in want] == adv


def test_gigpo_changes_exactly_the_anchored_steps(tmp_path, monkeypatch):
    """The same first step (same seed, same weights) with and without --step-advantage gigpo on TextWorld-Express:
    a step whose observation no other step of its group saw trains with its episode's advantage unchanged; an
    anchored one with its episode's + ω x (its return - the anchor group's mean return), and the steps of the
    start state (every episode's first) get different advantages. Step rewards are a function of the sampled
    tokens, so returns differ (the tiny model never writes the format, so the real reward is flat)."""
    monkeypatch.setattr(rewards, "policy_step_rewards",
                        lambda steps, *a: [-0.1 * (st["sample"].response_ids[0] % 5) for st in steps])
    played, trained = [], []
    run_episodes, grpo_update = rollout.run_episodes, train_rwml.grpo_update
    monkeypatch.setattr(rollout, "run_episodes", lambda *a, **k: played.append(run_episodes(*a, **k)) or played[-1])
    monkeypatch.setattr(train_rwml, "grpo_update", lambda seqs, *a: trained.append(seqs) or grpo_update(seqs, *a))
    args = ["--task", "policy", "--env", "twx", "--model", "tiny", "--prompts-per-step", "2", "--group-size", "3",
            "--max-env-steps", "3", "--max-new-tokens", "6", "--max-steps", "1", "--beta", "0", "--adv-scale", "none",
            "--gigpo-gamma", "0.5", "--gigpo-weight", "2"]
    train_rwml.main([*args, "--out-dir", str(tmp_path / "grpo")])
    train_rwml.main([*args, "--out-dir", str(tmp_path / "gigpo"), "--step-advantage", "gigpo"])
    (episodes, _), (plain, gigpo) = played, trained
    assert [q["response_ids"] for q in plain] == [q["response_ids"] for q in gigpo]   # the same rollouts
    steps = [(i, t) for i, ep in enumerate(episodes) for t in range(len(ep["steps"]))]
    assert len(steps) == len(gigpo)

    def ret(i, t):   # γ = 0.5 return of step t of episode i, from the patched step rewards
        rs = [-0.1 * (st["sample"].response_ids[0] % 5) for st in episodes[i]["steps"]]
        return sum(0.5 ** k * r for k, r in enumerate(rs[t:]))
    first_advs = []
    for (i, t), q0, q1 in zip(steps, plain, gigpo):
        same = [(j, u) for j, u in steps if j // 3 == i // 3 and (j, u) != (i, t)
                and episodes[j]["steps"][u]["obs"] == episodes[i]["steps"][t]["obs"]]
        if not same:
            assert q1["adv"] == q0["adv"]
            continue
        anchor = [ret(j, u) for j, u in same] + [ret(i, t)]
        assert q1["adv"] == pytest.approx(q0["adv"] + 2 * (ret(i, t) - sum(anchor) / len(anchor)), abs=1e-6)
        if t == 0:
            first_advs.append(q1["adv"] - q0["adv"])
    assert len(first_advs) == 6 and len({round(a, 6) for a in first_advs}) > 2
    row = metrics(tmp_path / "gigpo")[0]
    assert 0.3 <= row["gigpo_anchored_frac"] <= 1.0 and "gigpo_anchored_frac" not in metrics(tmp_path / "grpo")[0]


def test_gigpo_is_refused_for_the_world_model_task():
    with pytest.raises(SystemExit, match="--step-advantage gigpo is for --task policy"):
        train_rwml.check_settings(train_rwml.Settings(task="wm", step_advantage="gigpo"), common.Dist())


# ----------------------------------------------------------------------------------------------------------
# ECHO

def echo_batch(lm) -> list[dict]:
    """helpers' fixed batch with an observation span in every prompt, and sequences 0 and 1 on one prompt (a
    shared tree row under --share-prompt, whose observation stands for both)."""
    seqs = helpers.make_seqs(lm)
    seqs[1]["prompt_ids"] = list(seqs[0]["prompt_ids"])
    for q in seqs:
        q["obs_span"] = (1, len(q["prompt_ids"]) - 1)
    return seqs


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_echo_term_equals_the_mean_observation_nll(batch_echo, share):
    """grpo_update with --echo-coef: the parameters of the plain objective + coef x the mean NLL of exactly the
    observation tokens (two SGD epochs), its logged echo_nll that mean, and an update other than without ECHO."""
    lm, ref, seqs = batch_echo
    base = dict(lm.named_parameters())
    s = dataclasses.replace(helpers.grpo_settings(0.0), echo_coef=0.5, share_prompt=share)
    nll = []
    want = helpers.reference_update(lm, ref, seqs, s, nll)
    trained = copy.deepcopy(lm)
    stats = helpers.run_grpo_update(trained, ref, seqs, s, common.Dist())
    got = dict(trained.named_parameters())
    moved = max(float((want[k] - base[k]).abs().max()) for k in want)
    assert max(float((want[k] - got[k].detach()).abs().max()) for k in want) < 1e-5 * moved
    assert stats["echo_nll"] == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    without = helpers.reference_update(lm, ref, seqs, dataclasses.replace(s, echo_coef=0.0))
    assert max(float((want[k] - without[k]).abs().max()) for k in want) > 1e-2 * moved


@pytest.fixture(scope="module")
def batch_echo():
    lm, ref = helpers.make_models()
    return lm, ref, echo_batch(lm)


def test_echo_lowers_the_observation_nll(batch_echo):
    """Five updates on a fixed batch whose advantages are 0 (no policy-gradient signal), no KL: with ECHO the
    observation tokens' NLL falls; without it nothing moves."""
    lm, ref, seqs = batch_echo
    seqs = [{**q, "adv": 0.0} for q in seqs]

    def nll_after(coef):
        s = dataclasses.replace(helpers.grpo_settings(0.0), echo_coef=coef, beta=0.0, ppo_epochs=1, lr=0.1)
        trained = copy.deepcopy(lm)
        policy_logprobs = common.wrap_for_training(trained, common.Dist())
        for _ in range(5):
            helpers.run_grpo_update(policy_logprobs, ref, seqs, s, common.Dist())
        with torch.no_grad():
            return float(torch.cat([helpers.observation_nll(trained, q) for q in seqs]).mean())
    with torch.no_grad():
        before = float(torch.cat([helpers.observation_nll(lm, q) for q in seqs]).mean())
    assert nll_after(0.0) == pytest.approx(before, abs=1e-6)
    assert nll_after(1.0) < before - 1.0, before


def test_echo_in_policy_training_marks_the_observation_tokens(tmp_path, monkeypatch):
    """--echo-coef on TextWorld-Express: every trained step carries the token span of the observation it saw (the
    span decodes to that text, in the prompt the sampler was given), and echo_nll is logged; without the flag no
    span travels and nothing is logged."""
    played, trained = [], []
    run_episodes, grpo_update = rollout.run_episodes, train_rwml.grpo_update
    monkeypatch.setattr(rollout, "run_episodes", lambda *a, **k: played.append(run_episodes(*a, **k)) or played[-1])
    monkeypatch.setattr(train_rwml, "grpo_update", lambda seqs, *a: trained.append(seqs) or grpo_update(seqs, *a))
    args = ["--task", "policy", "--env", "twx", "--model", "tiny", "--prompts-per-step", "2", "--group-size", "2",
            "--max-env-steps", "3", "--max-new-tokens", "6", "--max-steps", "1", "--beta", "0"]
    train_rwml.main([*args, "--out-dir", str(tmp_path / "echo"), "--echo-coef", "0.1"])
    train_rwml.main([*args, "--out-dir", str(tmp_path / "off")])
    tok = common.load_tokenizer("tiny")
    steps = [st for ep in played[0] for st in ep["steps"]]
    assert len(steps) == len(trained[0])
    for st, q in zip(steps, trained[0]):
        a, b = q["obs_span"]
        assert q["prompt_ids"] == st["sample"].prompt_ids
        assert tok.decode(q["prompt_ids"][a:b]).strip() == st["obs"].strip()
    row = metrics(tmp_path / "echo")[0]
    assert 5.0 < row["echo_nll"] < 20.0    # the random tiny model: about log(49152) = 10.8 per token
    assert "echo_nll" not in metrics(tmp_path / "off")[0] and "obs_span" not in trained[1][0]


def test_echo_is_refused_for_the_world_model_task():
    with pytest.raises(SystemExit, match="--echo-coef 0.1 is for --task policy"):
        train_rwml.check_settings(train_rwml.Settings(task="wm", echo_coef=0.1), common.Dist())
