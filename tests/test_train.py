"""train_rwml.py end to end on the tiny model: it learns, it checkpoints, it resumes exactly, 2 ranks == 1 rank,
and --task policy plays TextWorld-Express. In-process main(argv) where possible; torchrun in a subprocess."""
import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DRIVER,
    HALF_VOCAB,
    half_vocab_reward,
    metrics,
    one_thread,  # noqa: F401 -- the autouse fixture applies here too
    save_peaked_tiny,
    small,
    toy_reward,
    weights,
    write_triples,
)
from safetensors.torch import load_file, save_file

import common
import train_rwml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def triples(tmp_path_factory) -> Path:
    return write_triples(tmp_path_factory.mktemp("data") / "triples.jsonl")


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory) -> str:
    return save_peaked_tiny(tmp_path_factory.mktemp("peaked"))


def test_mean_reward_rises(tmp_path, monkeypatch, triples, peaked_model):
    toy_reward(monkeypatch)
    train_rwml.main(small(peaked_model, triples, tmp_path, "--lr", "3e-2", "--max-steps", "20", "--save-every", "100"))
    r = [row["reward_mean"] for row in metrics(tmp_path)]
    assert len(r) == 20
    first, last = sum(r[:4]) / 4, sum(r[-4:]) / 4
    assert first < 0.65 and last > first + 0.25, r


def test_wm_task_with_rwml_reward_writes_loadable_checkpoint(tmp_path, triples):
    """The real reward (MiniLM embeddings), held-out accuracy, KL to the reference, and a checkpoint that
    common.load_model reads back."""
    final = train_rwml.main(["--model", "tiny", "--data", str(triples), "--val-data", str(triples), "--val-size", "4",
                             "--val-every", "1", "--out-dir", str(tmp_path), "--prompts-per-step", "4",
                             "--group-size", "2", "--max-new-tokens", "8", "--max-steps", "2", "--lr", "1e-3"])
    assert final == tmp_path / "ckpt" / "step_000002"
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "val_acc", "kl", "clip_frac_low", "clip_frac_high", "entropy",
                "resp_len", "format_error_rate", "tokens_per_s", "time_generate", "time_score", "time_train",
                "agree_mean", "agree_max", "zero_var_frac", "wm_identical_groups", "wm_pred_words", "alarms"):
        assert key in rows[-1], key
    assert 0.0 <= rows[-1]["val_acc"] <= 1.0
    assert json.loads((tmp_path / "config.json").read_text())["beta"] == 0.001   # the paper's wm default
    model, _ = common.load_model(str(final))
    trained = weights(final)
    assert torch.equal(model.state_dict()["model.norm.weight"], trained["model.norm.weight"])
    base, _ = common.load_model("tiny")
    assert not torch.equal(base.state_dict()["model.norm.weight"], trained["model.norm.weight"])


@pytest.mark.parametrize("lora", [[], ["--lora-rank", "4"]], ids=["full", "lora"])
def test_kill_and_resume_gives_the_uninterrupted_parameters(tmp_path, monkeypatch, triples, lora):
    """Killed mid-step 4 (step 3 logged, checkpoint at step 2), resumed: the parameters and the metrics rows of
    the uninterrupted run (LoRA: resumed from the adapters beside the merged model)."""
    args = ["--lr", "1e-2", "--max-steps", "4", "--save-every", "2", "--tis-cap", "2", *lora]
    toy_reward(monkeypatch)
    train_rwml.main(small("tiny", triples, tmp_path / "straight", *args))

    calls = []

    def killed_at_step_4(samples, triples):
        calls.append(1)
        if len(calls) == 4:     # mid-step 4: step 3 is in metrics.jsonl, the checkpoint is step 2's
            raise KeyboardInterrupt
        return half_vocab_reward(samples, triples)
    toy_reward(monkeypatch, killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_rwml.main(small("tiny", triples, tmp_path / "killed", *args))
    assert common.latest_checkpoint(tmp_path / "killed" / "ckpt").name == "step_000002"
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [1, 2, 3]
    toy_reward(monkeypatch)
    train_rwml.main(small("tiny", triples, tmp_path / "killed", *args, "--resume"))

    a, b = weights(tmp_path / "straight/ckpt/step_000004"), weights(tmp_path / "killed/ckpt/step_000004")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base, _ = common.load_model("tiny")
    q = "model.layers.0.self_attn.q_proj.weight"   # trained with and without LoRA
    assert not torch.equal(a[q], base.state_dict()[q])
    assert [r["step"] for r in metrics(tmp_path / "killed")] == [1, 2, 3, 4]
    assert [r["reward_mean"] for r in metrics(tmp_path / "killed")] == [r["reward_mean"] for r in
                                                                        metrics(tmp_path / "straight")]
    # a fresh run (no --resume) into a used out_dir starts its metrics anew
    train_rwml.main(small("tiny", triples, tmp_path / "straight", *args, "--max-steps", "1"))
    assert [r["step"] for r in metrics(tmp_path / "straight")] == [1]


def test_lora_checkpoints_load_as_the_trained_model(tmp_path, monkeypatch, triples):
    """Every LoRA checkpoint (and the run dir) loads, through common.load_model, as the base model with the
    trained adapters merged (peft's own merge is the reference); a checkpoint written with peft's layer names
    is refused with a message, never loaded with random q/k/v/o/gate/up/down weights."""
    from peft import LoraConfig, get_peft_model
    toy_reward(monkeypatch)
    train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "2", "--save-every", "1", "--lr", "1e-2",
                          "--lora-rank", "4", "--lora-alpha", "8", "--group-size", "4", "--max-new-tokens", "6"))
    base, _ = common.load_model("tiny")
    for name in ("ckpt/step_000001", "ckpt/step_000002", "."):
        ckpt = common.latest_checkpoint(tmp_path / "ckpt") if name == "." else tmp_path / name
        peft_lm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        missing, unexpected = peft_lm.get_base_model().load_state_dict(load_file(ckpt / common.ADAPTERS),
                                                                       strict=False)
        assert not unexpected and not [k for k in missing if "lora_" in k]
        want = peft_lm.merge_and_unload().state_dict()
        got = common.load_model(str(tmp_path / name))[0].state_dict()
        assert max(float((want[k] - got[k]).abs().max()) for k in want) < 1e-6
        assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                               base.state_dict()["model.layers.0.self_attn.q_proj.weight"])

    old_style = tmp_path / "old_style"      # what a LoRA checkpoint used to be: peft names in model.safetensors
    peft_lm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear"))
    peft_lm.get_base_model().save_pretrained(old_style)
    assert "base_layer" in " ".join(load_file(old_style / "model.safetensors"))
    with pytest.raises(ValueError, match="LoRA adapter-layer weights"):
        common.load_model(str(old_style))


def test_a_model_dir_with_missing_weights_is_refused(tmp_path):
    lm, tok = common.load_model("tiny")
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    w = load_file(tmp_path / "model.safetensors")
    del w["model.layers.1.mlp.down_proj.weight"]
    save_file(w, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight"):
        common.load_model(str(tmp_path))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, triples):
    out = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        toy_reward(mp)
        train_rwml.main(small("tiny", triples, out, "--max-steps", "1", "--group-size", "2", "--max-new-tokens", "4"))
    return out


@pytest.mark.parametrize("flag,value", [
    ("--max-prompt-tokens", "1000"), ("--tau-d", "0.3"), ("--tau-d-user", "0.3"), ("--embedder", "other"),
    ("--reward-mode", "score"), ("--reward-max-tokens", "50"), ("--step-penalty", "0.2"), ("--clip-low", "0.3"),
    ("--clip-high", "0.28"), ("--entropy-coef", "0.01"), ("--max-env-steps", "10"), ("--history", "5"),
    ("--zero-var-std", "0.1"), ("--precision", "bf16"), ("--lora-alpha", "16"), ("--grad-clip", "0.5")])
def test_resume_refuses_settings_that_change_the_objective_or_data(finished_run, triples, flag, value):
    with pytest.raises(SystemExit, match=flag):
        train_rwml.main(small("tiny", triples, finished_run, "--max-steps", "1", "--group-size", "2",
                              "--max-new-tokens", "4", "--resume", flag, value))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_accumulation_does_not_change_the_update(tmp_path, monkeypatch, triples, agg):
    """One micro-batch or eight: the loss is normalised over the whole batch, so the update is the same (with
    the entropy bonus and a k2 KL, which the script aggregates itself)."""
    toy_reward(monkeypatch)
    args = ["--agg", agg, "--max-steps", "2", "--lr", "1e-3", "--beta", "0.1", "--kl", "k2", "--entropy-coef", "0.01",
            "--group-size", "4", "--max-new-tokens", "6"]
    train_rwml.main(small("tiny", triples, tmp_path / "whole", *args, "--micro-batch", "16"))
    train_rwml.main(small("tiny", triples, tmp_path / "accum", *args, "--micro-batch", "2"))
    a, b = weights(tmp_path / "whole/ckpt/step_000002"), weights(tmp_path / "accum/ckpt/step_000002")
    # summation order differs between 1 and 8 micro-batches; Adam's first steps turn it into updates of up to
    # ~lr/10 on near-zero gradients (seen: 1.2e-6 and 9.1e-5, depending on the prompts), still below one step's
    # size (lr 1e-3), where a mis-scaled micro-batch would show; the grad-norm check below is the exact one
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 2e-4
    for whole, accum in zip(metrics(tmp_path / "whole"), metrics(tmp_path / "accum")):
        assert whole["loss"] == pytest.approx(accum["loss"], abs=1e-6)
        assert whole["grad_norm"] == pytest.approx(accum["grad_norm"], rel=1e-4)   # Adam would hide a scale error


@pytest.mark.parametrize("flags", [
    ["--lora-rank", "4"], ["--optim", "adamw8bit"], ["--grad-checkpointing"],
    ["--lr-schedule", "cosine", "--warmup-steps", "2"], ["--ppo-epochs", "3", "--beta", "0.01", "--kl", "k1"],
    ["--drop-zero-var", "--adv-scale", "none", "--clip-high", "0.28"]], ids=lambda f: f[0].lstrip("-"))
def test_ablation_settings_run(tmp_path, monkeypatch, triples, flags):
    toy_reward(monkeypatch)
    final = train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "2", "--lr", "1e-2", "--group-size", "4",
                                  "--max-new-tokens", "6", *flags))
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    if "--ppo-epochs" in flags:   # later epochs move away from the old log-probs: the clip engages, and the policy
        # leaves the reference (k1 = mean log(pi / pi_ref) over sampled tokens is signed on a finite sample)
        assert rows[0]["clip_frac_low"] + rows[0]["clip_frac_high"] > 0 and rows[0]["kl"] != 0
    if "--warmup-steps" in flags:
        assert [r["lr"] for r in rows] == pytest.approx([0.005, 0.01])
    if "--lora-rank" in flags:
        assert final == tmp_path / "ckpt" / "step_000002"
        model, _ = common.load_model(str(final))
        base, _ = common.load_model("tiny")
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, base.state_dict()[n])]
        assert changed and all("proj" in n for n in changed)   # LoRA adapts the linear layers only


def test_judge_score_reward_ablation(tmp_path, triples, monkeypatch):
    """--reward-mode judge-score --judge-model NAME: the judge make_judge builds scores every prediction."""
    import rewards
    built = []

    def fake_make_judge(name, device=None, max_new_tokens=64):
        built.append(name)
        return lambda messages: "7"
    monkeypatch.setattr(rewards, "make_judge", fake_make_judge)
    train_rwml.main(small("tiny", triples, tmp_path, "--max-steps", "1", "--group-size", "2", "--reward-mode",
                          "judge-score", "--judge-model", "some-judge"))
    assert built == ["some-judge"] and metrics(tmp_path)[0]["reward_mean"] == pytest.approx(0.7)
    with pytest.raises(SystemExit, match="needs --judge-model"):
        train_rwml.main(small("tiny", triples, tmp_path / "x", "--max-steps", "1", "--reward-mode", "judge-binary"))


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tmp_path, monkeypatch, triples, peaked_model):
    """Same global batch (4 prompts x G=8; 2 per rank under torchrun): the same samples and rewards, and the same
    parameters after two steps (FSDP2 on gloo; the global token-mean normalisation makes the gradients equal)."""
    args = ["--lr", "1e-2", "--max-steps", "2", "--gen-chunk", "2", "--micro-batch", "5", "--beta", "0.01"]
    toy_reward(monkeypatch)
    train_rwml.main(small(peaked_model, triples, tmp_path / "one", *args))

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), half=HALF_VOCAB))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           "2", str(driver), *small(peaked_model, triples, tmp_path / "two", *args)],
                          check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert two[1]["agree_max"] < 1e-4   # step 2 samples from the generation copy synced after step 1's update
    assert [r["reward_mean"] for r in one] == [r["reward_mean"] for r in two]   # identical samples
    assert [r["train_tokens"] for r in one] == [r["train_tokens"] for r in two]
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], abs=1e-6)
    a, b = weights(tmp_path / "one/ckpt/step_000002"), weights(tmp_path / "two/ckpt/step_000002")
    base, _ = common.load_model(peaked_model)
    moved = max(float((a[k] - base.state_dict()[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)


def test_policy_task_on_textworld_express(tmp_path):
    """Multi-turn GRPO: 2 tasks x 2 episodes of up to 3 steps, every step a training sample; the policy preset's
    settings, overridden by the flags given."""
    final = train_rwml.main(["--config", str(ROOT / "configs/alfworld_policy.json"), "--env", "twx", "--model", "tiny",
                             "--out-dir", str(tmp_path),
                             "--prompts-per-step", "2", "--group-size", "2", "--max-env-steps", "3",
                             "--max-new-tokens", "8", "--max-steps", "2", "--lr", "1e-3", "--micro-batch", "16",
                             "--step-penalty", "0.5"])
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["success_rate"] <= 1.0 and 0.0 <= r["invalid_rate"] <= 1.0
        assert 1 <= r["episode_len"] <= 3
        # 8 random tokens never hold <think>/<action>: every step pays the penalty, no episode is won
        assert r["success_rate"] == 0.0 and r["reward_mean"] == pytest.approx(-0.5 * r["episode_len"])
        assert r["train_seqs"] == round(r["episode_len"] * 4)   # one sample per step of each of the 4 episodes
        assert r["agree_max"] < 1e-4
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["beta"] == 0.01 and config["entropy_coef"] == 0.001   # the paper's policy RL, from the preset
    assert config["env"] == "twx" and config["max_steps"] == 2 and config["prompts_per_step"] == 2   # the flags win
    common.load_model(str(final))


PRESET_SCRIPT = {"collect": "collect", "filter": "filter", "wm": "train_rwml", "policy": "train_rwml",
                 "heldout": "collect", "format": "collect", "wm_sft": "filter", "rwml": "train_rwml", "eval": "evaluate", "expert": "collect"}


@pytest.mark.parametrize("preset", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.json")))
def test_every_preset_loads_with_its_script(preset):
    """Each configs/ file names only settings its script has, with values of their types and choices."""
    import importlib
    name = Path(preset).stem   # quick/<stage> or <env>_<stage>
    script = importlib.import_module(PRESET_SCRIPT[name if name in PRESET_SCRIPT else name.rsplit("_", 1)[-1]])
    s = common.parse_settings(script.Settings, ["--config", str(ROOT / preset)])
    assert all(getattr(s, k) == v for k, v in json.loads((ROOT / preset).read_text()).items())


def test_policy_with_the_world_model_defaults_warns(capsys):
    d = common.Dist()
    train_rwml.check_settings(train_rwml.Settings(task="policy"), d)
    assert "configs/alfworld_policy.json" in capsys.readouterr().out
    policy = common.parse_settings(train_rwml.Settings, ["--config", str(ROOT / "configs/alfworld_policy.json")])
    train_rwml.check_settings(policy, d)
    train_rwml.check_settings(train_rwml.Settings(task="wm"), d)
    assert capsys.readouterr().out == ""
