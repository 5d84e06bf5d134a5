"""The trainer catches the silent GRPO bugs by itself (diagnostics.py, README "Diagnostics"). Token-in/token-out,
rollout/trainer log-prob agreement (and a wrong trainer temperature caught), positive log-probs, truncated IS,
zero-variance groups, alarms, non-finite steps, and the world-model reward-hacking monitor."""
import math

import pytest
import torch
from helpers import (
    half_vocab_reward,
    metrics,
    one_thread,  # noqa: F401 -- the autouse fixture applies here too
    save_peaked_tiny,
    small,
    toy_reward,
    write_triples,
)

import common
import diagnostics
import train_rwml
from prompts import extract_next_state


@pytest.fixture(scope="module")
def triples(tmp_path_factory):
    return write_triples(tmp_path_factory.mktemp("data") / "triples.jsonl", n=4)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> str:
    return save_peaked_tiny(tmp_path_factory.mktemp("peaked"))


def one_step(model, triples, out, *extra):
    train_rwml.main(small(model, triples, out, "--max-steps", "1", "--lr", "1e-3", "--group-size", "4",
                          "--max-new-tokens", "12", *extra))
    return metrics(out)[-1]


# ----------------------------------------------------------------------------------------------------------
# (1) token-in, token-out

def test_training_uses_the_sampled_ids_even_when_retokenizing_changes_them(tmp_path, monkeypatch, triples):
    tok = common.load_tokenizer("tiny")
    # " hello" spelled letter by letter: decodes to the same text, re-encodes to one token
    sampled = tok.convert_tokens_to_ids(["Ġ", "h", "e", "l", "l", "o"]) + [tok.eos_token_id]
    text = tok.decode(sampled, skip_special_tokens=True)
    assert text == " hello" and tok(text, add_special_tokens=False)["input_ids"] != sampled[:-1]

    def spelled_generate(model, tokenizer, prompts, max_new_tokens, temperature, top_p, batch_size, generator):
        lps = common.sequence_logprobs(model, prompts, [sampled] * len(prompts), temperature)  # sampler's log-probs
        return [common.Sample(p, list(sampled), text, lp.tolist(), True) for p, lp in zip(prompts, lps)]
    monkeypatch.setattr(common, "generate", spelled_generate)
    seen = []
    forward = common.TokenLogprobs.forward

    def spy(self, input_ids, attention_mask, loss_mask, *a, **kw):
        if self.training:
            seen.append((input_ids.clone(), loss_mask.clone()))
        return forward(self, input_ids, attention_mask, loss_mask, *a, **kw)
    monkeypatch.setattr(common.TokenLogprobs, "forward", spy)
    toy_reward(monkeypatch)
    row = one_step("tiny", triples, tmp_path)

    assert seen
    for ids, mask in seen:
        for b in range(ids.shape[0]):   # a row: one sequence, or a prompt's responses back to back (--share-prompt)
            scored = ids[b][mask[b]].tolist()
            assert scored and scored == sampled * (len(scored) // len(sampled))   # exactly the sampled tokens
    assert row["agree_max"] < 1e-5                          # and the trainer scored the very same tokens


# ----------------------------------------------------------------------------------------------------------
# (2) agreement, log-probs <= 0

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_and_trainer_logprobs_agree_on_cpu_fp32(tmp_path, monkeypatch, triples, peaked_model, temperature):
    toy_reward(monkeypatch)
    row = one_step(peaked_model, triples, tmp_path, "--temperature", temperature)
    assert row["agree_max"] < 1e-4 and row["agree_mean"] < 1e-5
    assert not any("mismatch" in a for a in row["alarms"])


def test_a_wrong_trainer_temperature_is_detected(tmp_path, monkeypatch, capsys, triples, peaked_model):
    """The classic bug: temperature applied when sampling, forgotten in the trainer's log-probs."""
    forward = common.TokenLogprobs.forward
    monkeypatch.setattr(common.TokenLogprobs, "forward",
                        lambda self, ids, attn, mask, temperature=1.0, with_entropy=False, **kw:
                        forward(self, ids, attn, mask, 1.0, with_entropy, **kw))
    toy_reward(monkeypatch)
    row = one_step(peaked_model, triples, tmp_path, "--temperature", 0.7, "--tis-cap", 2)
    assert row["agree_mean"] > diagnostics.AGREE_TOL
    assert any("log-prob mismatch" in a for a in row["alarms"])
    assert "ALARM step 1: rollout/trainer log-prob mismatch" in capsys.readouterr().out
    assert row["tis_capped_frac"] > 0 and row["tis_weight_mean"] != pytest.approx(1.0, abs=1e-3)


def test_a_positive_logprob_stops_training(tmp_path, monkeypatch, triples):
    real = common.generate

    def broken(*a, **kw):
        out = real(*a, **kw)
        for x in out:
            x.logprobs = [-lp for lp in x.logprobs]   # a sign bug: "log-probs" of +10
        return out
    monkeypatch.setattr(common, "generate", broken)
    toy_reward(monkeypatch)
    with pytest.raises(RuntimeError, match="above zero"):
        one_step("tiny", triples, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# (3) truncated importance sampling

def test_tis_weights_are_capped_ratios_on_the_mask():
    old = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    rollout = torch.tensor([[0.0, -2.0, -1.0, -3.0]])
    mask = torch.tensor([[False, True, True, True]])
    w = diagnostics.tis_weights(old, rollout, mask, cap=2.0)
    assert torch.allclose(w, torch.tensor([[0.0, 2.0, math.exp(-1.0), 2.0]]))


def test_tis_is_a_no_op_when_sampler_and_trainer_agree(tmp_path, monkeypatch, triples):
    toy_reward(monkeypatch)
    off = one_step("tiny", triples, tmp_path / "off")
    on = one_step("tiny", triples, tmp_path / "on", "--tis-cap", 2)
    assert on["tis_weight_mean"] == pytest.approx(1.0, abs=1e-4) and on["tis_capped_frac"] == 0.0
    assert on["loss"] == pytest.approx(off["loss"], abs=1e-6)


# ----------------------------------------------------------------------------------------------------------
# (4) zero-variance groups

def test_zero_variance_uses_a_std_threshold():
    binary = torch.tensor([1.0, 1, 1, 1, 0, 1, 0, 0])
    assert diagnostics.zero_variance_groups(binary, 4, 0.01).tolist() == [True, False]
    snapped = torch.tensor([0.4, 0.4, 0.4, 0.4 + 1e-9, 0.4, 0.4, 0.6, 0.4])   # ROUGE snapped to 0.2, float noise
    assert diagnostics.zero_variance_groups(snapped, 4, 0.01).tolist() == [True, False]
    cosine = torch.tensor([0.81, 0.812, 0.809, 0.811])                      # raw cosine, --reward-mode score
    assert diagnostics.zero_variance_groups(cosine, 4, 0.01).tolist() == [True]
    assert diagnostics.zero_variance_groups(torch.tensor([1.0, float("nan")]), 2, 0.01).tolist() == [True]


def test_zero_variance_groups_are_logged_and_dropped(tmp_path, monkeypatch, triples):
    def half_constant(samples, triples):   # the groups of triples t0 and t2 all score 0.5
        r = half_vocab_reward(samples, triples)
        return torch.where(torch.tensor([t["id"] in ("t0", "t2") for t in triples]), 0.5, r)
    toy_reward(monkeypatch, half_constant)
    kept = one_step("tiny", triples, tmp_path / "kept")
    dropped = one_step("tiny", triples, tmp_path / "dropped", "--drop-zero-var")
    assert kept["zero_var_frac"] == dropped["zero_var_frac"] == 0.5
    assert kept["train_seqs"] == 16 and dropped["train_seqs"] == 8 and dropped["dropped_groups"] == 2


def test_zero_variance_share_splits_into_all_right_and_all_wrong_groups():
    """Binary rewards, G 4: one group all right, two all wrong, one mixed -> 3/4 zero-variance, 1/4 of them hits."""
    rewards = [1.0] * 4 + [0.0] * 4 + [1.0, 0.0, 0.0, 1.0] + [0.0] * 4
    every = {"rewards": rewards, "texts": ["<action>look</action>"] * 16, "lens": [3] * 16, "cut": [False] * 16,
             "won": rewards, "valid": [True] * 16, "ep_len": [1] * 16,
             "zero_var": diagnostics.zero_variance_groups(torch.tensor(rewards), 4, 0.01).tolist()}
    row = diagnostics.rollout_metrics(every, 4, False, "twx")
    assert row["zero_var_frac"] == 0.75 and row["zero_var_hit_frac"] == 0.25


# ----------------------------------------------------------------------------------------------------------
# (5) alarms and non-finite steps

HEALTHY = {"resp_len": 100.0, "entropy": 1.0, "format_error_rate": 0.1, "invalid_rate": 0.2, "loss": 0.1,
           "grad_norm": 1.0, "reward_mean": 0.4, "agree_mean": 1e-3, "agree_max": 0.1, "zero_var_frac": 0.2}
START = {"resp_len": 100.0, "entropy": 1.0, "format_error_rate": 0.1, "invalid_rate": 0.2}


@pytest.mark.parametrize("change, words", [
    ({"resp_len": 350.0}, "response length"),
    ({"format_error_rate": 0.4}, "format-error rate"),
    ({"invalid_rate": 0.5}, "invalid-action rate"),
    ({"entropy": 0.05}, "entropy collapse"),
    ({"loss": float("nan")}, "non-finite loss"),
    ({"grad_norm": float("inf")}, "non-finite grad_norm"),
    ({"zero_var_frac": 0.95}, "zero reward variance"),
    ({"agree_mean": 0.3}, "log-prob mismatch"),
])
def test_alarms_fire(change, words):
    assert diagnostics.check_alarms(HEALTHY, START) == []
    alarms = diagnostics.check_alarms({**HEALTHY, **change}, START)
    assert len(alarms) == 1 and words in alarms[0], alarms


def test_start_relative_alarms_wait_for_the_start_values():
    assert diagnostics.check_alarms({**HEALTHY, "resp_len": 1000.0}, {}) == []


def test_alarm_start_values_come_from_the_first_steps(tmp_path, monkeypatch, triples):
    toy_reward(monkeypatch)
    monkeypatch.setattr(diagnostics, "ALARM_WARMUP", 2)
    monkeypatch.setattr(diagnostics, "LENGTH_ALARM", 0.5)
    train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "3", "--lr", "1e-3", "--max-new-tokens", "4",
                          "--group-size", "2"))
    alarms = [r["alarms"] for r in metrics(tmp_path)]
    # length 4 every step: past 0.5x its start as soon as the start is known (after 2 steps)
    assert not any("response length" in a for a in alarms[0]) and any("response length" in a for a in alarms[2])


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, triples):
    toy_reward(monkeypatch, lambda samples, triples: torch.full((len(samples),), float("nan")))
    monkeypatch.setattr(diagnostics, "MAX_NONFINITE", 2)
    with pytest.raises(SystemExit, match="2 non-finite steps in a row"):
        train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "5", "--save-every", "1", "--group-size", "2",
                              "--max-new-tokens", "4", "--lr", "1e-2"))
    rows = metrics(tmp_path)
    assert [r["nonfinite_skips"] for r in rows] == [1, 2]
    assert any("non-finite reward_mean" in a for a in rows[0]["alarms"])
    base, _ = common.load_model("tiny")   # the skipped updates never touched the weights
    trained, _ = common.load_model(str(tmp_path / "ckpt" / "step_000001"))
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), trained.parameters()))


# ----------------------------------------------------------------------------------------------------------
# (6) world-model reward hacking (paper §3.4)

TRUTHS = ["You pick up the apple from the table 1.", "The drawer 1 is open. In it, you see a key.",
          "You arrive at countertop 2. On it, you see a mug.", "Nothing happens."]


def wm(predict):
    G = 4
    preds = [f"<think>x</think><next_state>{predict(t, g)}</next_state>" for t in TRUTHS for g in range(G)]
    row = diagnostics.wm_hacking_monitor([extract_next_state(p) for p in preds], TRUTHS, G)
    return row, diagnostics.check_alarms({**HEALTHY, **row}, START)


def test_a_generic_predictor_raises_the_hacking_monitor():
    generic = ["You are in the middle of a room.", "you are in the middle of a room"]   # case/punctuation apart
    row, alarms = wm(lambda truth, g: generic[g % 2])
    assert row["wm_identical_groups"] == 1.0 and row["wm_top_pred_share"] == 1.0
    assert row["wm_pred_words"] == 8 and row["wm_true_words"] > 8
    assert any("generic world-model predictions" in a for a in alarms)


def test_an_accurate_or_diverse_predictor_does_not():
    accurate, alarms = wm(lambda truth, g: truth)          # confident and right: identical groups, no alarm
    assert accurate["wm_identical_groups"] == 1.0 and accurate["wm_top_pred_share"] == 0.25 and alarms == []
    diverse, alarms = wm(lambda truth, g: TRUTHS[(TRUTHS.index(truth) + g) % len(TRUTHS)])
    assert diverse["wm_identical_groups"] == 0.0 and alarms == []
    near, _ = wm(lambda truth, g: truth + ("" if g else " ."))   # punctuation only: still near-identical
    assert near["wm_identical_groups"] == 1.0
