"""The policy objectives beyond GRPO, each against a plain computation and in the trainer: GiGPO's step-level
advantages (--step-advantage gigpo), ECHO's observation-token cross-entropy (--echo-coef) and Dyna's world-model
GRPO loss on the policy step's own transitions (--dyna-coef)."""
import copy
import dataclasses
import math
from pathlib import Path

import helpers
import pytest
import torch
from helpers import metrics, one_thread, weights  # noqa: F401 -- one_thread: autouse

import common
import prompts
import rewards
import rollout
import train_rwml
from kernels import group_advantages

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
    monkeypatch.setattr(train_rwml, "grpo_update",
                        lambda seqs, *a, **k: trained.append(seqs) or grpo_update(seqs, *a, **k))
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
    monkeypatch.setattr(train_rwml, "grpo_update",
                        lambda seqs, *a, **k: trained.append(seqs) or grpo_update(seqs, *a, **k))
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


# ----------------------------------------------------------------------------------------------------------
# Dyna: the world-model GRPO objective on the policy step's own transitions

def world_model_batch(lm) -> list[dict]:
    """2 world-model prompts x G = 3 predictions (consecutive, one prompt each group: a tree row under
    --share-prompt), random ids, their own advantages; the sampler's log-probs are the policy's."""
    g = torch.Generator().manual_seed(3)
    seqs = []
    for i in range(2):
        p = torch.randint(0, 49152, (4 + i,), generator=g).tolist()
        for j in range(3):
            r = torch.randint(0, 49152, (2 + (i + j) % 4,), generator=g).tolist()
            seqs.append({"prompt_ids": p, "response_ids": r, "adv": float(torch.randn((), generator=g))})
    with torch.no_grad():
        for q in seqs:
            q["logprobs"] = helpers.response_logprobs(lm, q).tolist()
    return seqs


@pytest.mark.parametrize("share", [True, False], ids=["shared", "unshared"])
def test_dyna_update_is_the_policy_loss_plus_c_times_the_world_model_loss(share):
    """grpo_update with a Dyna part: the parameters of (policy GRPO loss over its tokens) + C x (world-model GRPO loss
    over its own tokens), both written out (two SGD epochs: the clip and old log-probs matter), with the logged
    loss / dyna_loss each part's own last-epoch value; without the part, another update."""
    lm, ref = helpers.make_models()
    seqs, wm = helpers.make_seqs(lm), world_model_batch(lm)
    s = dataclasses.replace(helpers.grpo_settings(0.0), share_prompt=share)
    base = dict(lm.named_parameters())
    losses = []
    want = helpers.reference_update(lm, ref, seqs, s, dyna=(wm, 0.5), losses=losses)
    trained = copy.deepcopy(lm)
    stats = helpers.run_grpo_update(trained, ref, seqs, s, common.Dist(), dyna=(wm, 0.5))
    got = dict(trained.named_parameters())
    moved = max(float((want[k] - base[k]).abs().max()) for k in want)
    assert max(float((want[k] - got[k].detach()).abs().max()) for k in want) < 1e-5 * moved
    (_, (policy_loss, wm_loss)) = losses
    assert stats["loss"] == pytest.approx(policy_loss, rel=1e-5)
    assert stats["dyna_loss"] == pytest.approx(wm_loss, rel=1e-5)
    assert stats["train_seqs"] == len(seqs) and stats["dyna_train_seqs"] == len(wm)
    assert stats["dyna_train_tokens"] == sum(len(q["response_ids"]) for q in wm) and "dyna_kl" in stats
    without = helpers.reference_update(lm, ref, seqs, s)
    assert max(float((want[k] - without[k]).abs().max()) for k in want) > 1e-2 * moved


POLICY = ["--task", "policy", "--env", "twx", "--model", "tiny", "--prompts-per-step", "2", "--group-size", "2",
          "--max-env-steps", "3", "--max-new-tokens", "6", "--beta", "0", "--lr", "1e-2", "--save-every", "1"]
DYNA = ["--dyna-prompts", "3", "--dyna-group-size", "4", "--dyna-max-new-tokens", "8"]


@pytest.fixture
def every_step_a_transition(monkeypatch):
    """The tiny model never writes an admissible <action>, so none of its steps would become a triple: here each
    step the env answered does (the reward of the world-model part is the half-vocabulary toy one)."""
    monkeypatch.setattr(rollout, "is_transition", lambda step: bool(step["next_obs"]))
    helpers.toy_reward(monkeypatch)


def no_timings(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "tokens_per_s"} for r in rows]


def test_dyna_off_is_the_plain_update_and_on_trains_the_steps_transitions(tmp_path, monkeypatch,
                                                                           every_step_a_transition):
    """--dyna-coef 0: bitwise the plain policy run. --dyna-schedule every:2: step 1 is the plain step (bitwise),
    step 2 trains, beside the policy's steps, G = 4 predictions of 3 of that step's own transitions (their RWML
    prompts, the toy reward's group advantages) and logs their dyna_* numbers."""
    played, updates = [], []
    run_episodes, grpo_update = rollout.run_episodes, train_rwml.grpo_update
    monkeypatch.setattr(rollout, "run_episodes", lambda *a, **k: played.append(run_episodes(*a, **k)) or played[-1])
    monkeypatch.setattr(train_rwml, "grpo_update",
                        lambda seqs, *a, **k: updates.append(a[-1]) or grpo_update(seqs, *a, **k))
    args = [*POLICY, "--max-steps", "2"]
    train_rwml.main([*args, "--out-dir", str(tmp_path / "plain")])
    train_rwml.main([*args, *DYNA, "--dyna-coef", "0", "--out-dir", str(tmp_path / "zero")])
    played.clear(), updates.clear()
    train_rwml.main([*args, *DYNA, "--dyna-coef", "0.5", "--dyna-schedule", "every:2", "--out-dir",
                     str(tmp_path / "dyna")])

    def same(a, b, step):
        wa, wb = weights(tmp_path / a / f"ckpt/step_00000{step}"), weights(tmp_path / b / f"ckpt/step_00000{step}")
        return all(torch.equal(wa[k], wb[k]) for k in wa)
    assert same("plain", "zero", 1) and same("plain", "zero", 2)
    assert no_timings(metrics(tmp_path / "zero")) == no_timings(metrics(tmp_path / "plain"))
    assert same("plain", "dyna", 1) and not same("plain", "dyna", 2)
    first, second = metrics(tmp_path / "dyna")
    assert not [k for k in [*first, *metrics(tmp_path / "plain")[1]] if k.startswith("dyna_")]
    assert second["dyna_weight"] == 0.5 and second["dyna_prompts"] == 3 and second["dyna_train_seqs"] == 12
    assert 0 <= second["dyna_reward_mean"] <= 1 and 0 <= second["dyna_zero_var_frac"] <= 1
    assert math.isfinite(second["dyna_loss"]) and second["time_dyna"] > 0

    assert updates[0] is None
    wm_seqs, weight = updates[1]
    assert weight == 0.5 and len(wm_seqs) == 12
    tok = common.load_tokenizer("tiny")
    transitions = [common.chat_ids(tok, prompts.wm_messages(t)) for ep in played[1]
                   for t in rollout.episode_triples(ep, 2)]
    groups = [wm_seqs[i:i + 4] for i in range(0, 12, 4)]
    assert all(len({tuple(q["prompt_ids"]) for q in g}) == 1 and g[0]["prompt_ids"] in transitions for g in groups)
    rewards = helpers.half_vocab_reward([common.Sample([], q["response_ids"], "", [], True) for q in wm_seqs], [])
    adv = group_advantages(rewards, 4)
    assert [q["adv"] for q in wm_seqs] == pytest.approx(adv.tolist(), abs=1e-6)
    assert all(len(q["response_ids"]) <= 8 for q in wm_seqs) and max(len(q["response_ids"]) for q in wm_seqs) > 6


def test_dyna_run_resumes_exactly(tmp_path, monkeypatch, every_step_a_transition):
    """Killed in step 3's world-model reward, resumed from step 2's checkpoint: the parameters and metrics of the
    uninterrupted run (Dyna's samples are keyed by seed and step, like the policy's). --keep-checkpoints 0 keeps
    every checkpoint."""
    args = [*POLICY, *DYNA, "--dyna-coef", "1", "--max-steps", "3", "--keep-checkpoints", "0"]
    train_rwml.main([*args, "--out-dir", str(tmp_path / "straight")])
    calls = []

    def killed_in_step_3(samples, triples):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return helpers.half_vocab_reward(samples, triples)
    helpers.toy_reward(monkeypatch, killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_rwml.main([*args, "--out-dir", str(tmp_path / "killed")])
    helpers.toy_reward(monkeypatch)
    train_rwml.main([*args, "--out-dir", str(tmp_path / "killed"), "--resume"])
    assert sorted(p.name for p in (tmp_path / "straight/ckpt").glob("step_*")) == [f"step_00000{i}" for i in (1, 2, 3)]
    a, b = weights(tmp_path / "straight/ckpt/step_000003"), weights(tmp_path / "killed/ckpt/step_000003")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert no_timings(metrics(tmp_path / "killed")) == no_timings(metrics(tmp_path / "straight"))


def test_dyna_raises_the_world_model_reward(tmp_path, monkeypatch, every_step_a_transition):
    """Policy RL whose own reward is flat (the tiny model never wins: zero advantages, no KL), six steps with Dyna
    and without: on the first step's transitions (the same in both runs), the world-model predictions of the Dyna
    run earn more of the world-model (toy) reward; without Dyna nothing moves it."""
    played = []
    run_episodes = rollout.run_episodes
    monkeypatch.setattr(rollout, "run_episodes", lambda *a, **k: played.append(run_episodes(*a, **k)) or played[-1])
    model = helpers.save_peaked_tiny(tmp_path / "peaked")
    args = [*POLICY, "--model", model, "--max-steps", "6", "--lr", "5e-2", "--dyna-prompts", "8",
            "--dyna-group-size", "8", "--dyna-max-new-tokens", "8", "--save-every", "100"]
    train_rwml.main([*args, "--out-dir", str(tmp_path / "off")])
    train_rwml.main([*args, "--dyna-coef", "1", "--out-dir", str(tmp_path / "on")])
    tok = common.load_tokenizer("tiny")
    wm_prompts = [common.chat_ids(tok, prompts.wm_messages(t)) for ep in played[0]
                  for t in rollout.episode_triples(ep, 2)][:6]

    def reward(name: str) -> float:
        lm, _ = common.load_model(name)
        samples = common.generate(lm, tok, [p for p in wm_prompts for _ in range(16)], 8, 1.0, batch_size=96,
                                  generator=torch.Generator().manual_seed(0))
        return float(helpers.half_vocab_reward(samples, []).mean())
    start, off, on = reward(model), reward(str(tmp_path / "off")), reward(str(tmp_path / "on"))
    assert abs(off - start) < 0.05 and on > off + 0.1, (start, off, on)
    assert all("dyna_reward_mean" in r for r in metrics(tmp_path / "on"))


@pytest.mark.parametrize("kw, match", [
    ({"task": "wm"}, "--dyna-coef 0.5 is for --task policy"),
    ({"env": "tau2"}, "text games only"),
    ({"dyna_coef": -1.0}, "must be >= 0"),
    ({"dyna_schedule": "every:0"}, "--dyna-schedule 'every:0'"),
    ({"dyna_schedule": "cosine"}, "expected constant, linear or every:K"),
    ({"dyna_group_size": 1}, "G >= 2")])
def test_dyna_bad_settings_are_refused(kw, match):
    s = train_rwml.Settings(**{"task": "policy", "dyna_coef": 0.5, **kw})
    with pytest.raises(SystemExit, match=match):
        train_rwml.check_settings(s, common.Dist())


def test_dyna_schedules():
    s = train_rwml.Settings(task="policy", dyna_coef=2.0)
    def weight(schedule):
        return [train_rwml.dyna_weight(dataclasses.replace(s, dyna_schedule=schedule), step, 4) for step in range(4)]
    assert weight("constant") == [2.0] * 4 and weight("every:2") == [0.0, 2.0, 0.0, 2.0]
    assert weight("linear") == [2.0, 1.5, 1.0, 0.5]
