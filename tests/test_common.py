import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import common

PROMPTS = ["Say hello.", "What is 2 + 2? Answer briefly.", "Name a fruit.", "Describe a kitchen in one sentence."]


@pytest.fixture(scope="module")
def tiny():
    return common.load_model("tiny")


def _ids(tok, texts):
    return [common.chat_ids(tok, [{"role": "user", "content": t}]) for t in texts]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_a_fresh_forward_pass(tiny, temperature):
    model, tok = tiny
    gen = torch.Generator().manual_seed(0)
    samples = common.generate(model, tok, _ids(tok, PROMPTS), max_new_tokens=12, temperature=temperature,
                              generator=gen)
    again = common.sequence_logprobs(model, [s.prompt_ids for s in samples], [s.response_ids for s in samples],
                                     temperature=temperature, pad_id=tok.pad_token_id)
    for s, lp in zip(samples, again):
        assert len(s.response_ids) == len(s.logprobs) == len(lp) > 0
        assert max(s.logprobs) <= 0
        torch.testing.assert_close(torch.tensor(s.logprobs), lp, atol=1e-4, rtol=0)


def test_top_p_logprobs_are_of_the_truncated_distribution():
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    lp = common._sampling_logprobs(logits, temperature=1.0, top_p=0.8)
    p = torch.softmax(logits[0], -1)
    assert p[0] < 0.8 < p[0] + p[1]  # so the nucleus is exactly tokens {0, 1}
    torch.testing.assert_close(lp[0, :2].exp(), p[:2] / p[:2].sum())
    assert torch.isinf(lp[0, 2:]).all()


def test_sample_tokens_draws_each_token_at_its_probability():
    """Two rows, one with zero-probability tokens (top-p's -inf) among the others: 200k draws per row land on
    each token at its probability (within 5 standard errors) and never on a token of probability 0."""
    p = torch.tensor([[0.5, 0.0, 0.2, 0.0, 0.3], [0.05, 0.15, 0.25, 0.35, 0.2]])
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    draws = common.sample_tokens(p.log().repeat(n, 1), gen).view(n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        se = (p[row].double() * (1 - p[row].double()) / n).sqrt()
        assert ((freq - p[row].double()).abs() <= 5 * se + 1e-12).all(), (row, freq)
    assert not torch.isin(draws[:, 0], torch.tensor([1, 3])).any()


def test_greedy_generation_equals_argmax_of_full_forwards(tiny):
    """The preallocated KV cache must give what recomputing the whole sequence gives, token by token."""
    model, tok = tiny
    prompt = _ids(tok, PROMPTS[:1])[0]
    out = common.generate(model, tok, [prompt], max_new_tokens=16, temperature=0.0)[0]
    seq, logprobs = list(prompt), []
    with torch.no_grad():
        for _ in out.response_ids:
            logp = model(input_ids=torch.tensor([seq])).logits[0, -1].float().log_softmax(-1)
            seq.append(int(logp.argmax()))
            logprobs.append(float(logp.max()))
    assert seq[len(prompt):] == out.response_ids
    torch.testing.assert_close(torch.tensor(out.logprobs), torch.tensor(logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("prefill_one_by_one", [False, True])
def test_left_padded_batch_greedy_equals_one_by_one(tiny, prefill_one_by_one):
    """Both prefills (the padded batch with its mask, each prompt alone written into the padded cache) decode what
    each prompt decodes alone."""
    model, tok = tiny
    prompts = _ids(tok, PROMPTS)
    batched = common.generate(model, tok, prompts, max_new_tokens=10, temperature=0.0, batch_size=4,
                              prefill_one_by_one=prefill_one_by_one)
    for p, b in zip(prompts, batched):
        single = common.generate(model, tok, [p], max_new_tokens=10, temperature=0.0, prefill_one_by_one=False)[0]
        assert single.response_ids == b.response_ids
        assert b.prompt_ids == p
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=0)


def test_sampling_is_reproducible_by_generator(tiny):
    model, tok = tiny
    run = lambda: [s.response_ids for s in common.generate(  # noqa: E731
        model, tok, _ids(tok, PROMPTS), max_new_tokens=8, generator=torch.Generator().manual_seed(3))]
    assert run() == run()


def test_tiny_is_deterministic_and_small():
    (a, _), (b, _) = common.load_model("tiny"), common.load_model("tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert sum(p.numel() for p in a.parameters()) < 1_000_000


def test_unknown_model_error_lists_accepted_names():
    with pytest.raises(ValueError, match="accepted: tiny, smollm2-135m"):
        common.load_model("no-such-model")


def test_checkpoint_round_trips_bit_exactly_and_resumes_rng(tiny, tmp_path):
    model, tok = tiny
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = torch.tensor([_ids(tok, PROMPTS[:1])[0]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step(), sched.step()
    common.seed_everything(7)
    path = common.save_checkpoint(tmp_path / "ckpt", 5, model, tok, opt, sched, extra={"data_pos": 12})
    expected_draws = (random.random(), np.random.rand(), torch.rand(3))
    assert common.latest_checkpoint(tmp_path / "ckpt") == path

    fresh, _ = common.load_model("tiny")
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (1 + s))
    state = common.load_checkpoint(path, fresh, opt2, sched2)
    assert state == {"step": 5, "extra": {"data_pos": 12}}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert sched2.state_dict()["last_epoch"] == 1
    for ga, gb in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(ga[k], gb[k]) for k in ga)
    draws = (random.random(), np.random.rand(), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])
    # the saved model directory is also a plain model for load_model
    loaded, _ = common.load_model(str(path))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_checkpoints_keep_only_the_newest(tiny, tmp_path):
    model, tok = tiny
    for step in (1, 2, 3):
        common.save_checkpoint(tmp_path, step, model, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000002", "step_000003"]
    assert common.latest_checkpoint(tmp_path).name == "step_000003"


@dataclass
class Settings:
    """a test script"""
    model: str = "tiny"
    lr: float = 1e-6
    steps: int = 10
    gradient_checkpointing: bool = False
    resume: str | None = None
    task: str = field(default="wm", metadata={"choices": ("wm", "policy")})


def test_settings_flags_config_and_errors(tmp_path, capsys):
    s = common.parse_settings(Settings, ["--lr", "3e-4", "--gradient-checkpointing", "--resume", "none"])
    assert (s.lr, s.gradient_checkpointing, s.resume, s.steps) == (3e-4, True, None, 10)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"steps": 99, "lr": 0.5}))
    s = common.parse_settings(Settings, ["--config", str(cfg), "--lr", "0.1"])
    assert (s.steps, s.lr) == (99, 0.1)
    common.save_config(s, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["steps"] == 99

    for argv, needle in [(["--lrr", "1"], "--lrr"), (["--steps", "ten"], "--steps"),
                         (["--task", "x"], "--task"), (["--st", "3"], "--st")]:
        with pytest.raises(SystemExit):
            common.parse_settings(Settings, argv)
        assert needle in capsys.readouterr().err
    for bad, needle in [({"stepz": 1}, "unknown setting 'stepz'"), ({"steps": "ten"}, "steps = 'ten' is not a int"),
                        ({"task": "x"}, "task = 'x': choose from wm, policy"), ({"steps": True}, "is not a int")]:
        cfg.write_text(json.dumps(bad))
        with pytest.raises(SystemExit):
            common.parse_settings(Settings, ["--config", str(cfg)])
        assert needle in capsys.readouterr().err


def test_a_flag_given_at_its_default_value_beats_the_config_file(tmp_path):
    """The command line always wins over --config, also when the flag's value equals the field's default."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"lr": 3e-5, "gradient_checkpointing": True, "resume": "x", "steps": 2}))
    for argv in (["--lr", "1e-6", "--config", str(cfg)], ["--config", str(cfg), "--lr", "1e-6"]):
        s = common.parse_settings(Settings, [*argv, "--no-gradient-checkpointing", "--resume", "none"])
        assert (s.lr, s.gradient_checkpointing, s.resume, s.steps) == (1e-6, False, None, 2)
    s = common.parse_settings(Settings, ["--config", str(cfg)])
    assert (s.lr, s.gradient_checkpointing, s.resume, s.steps) == (3e-5, True, "x", 2)


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(common.DataError, match=r"t\.jsonl:2: not valid JSON"):
        common.read_jsonl(path)
    path.write_text('{"id": 1}\n\n{"x": 2}\n')
    with pytest.raises(common.DataError, match=r"t\.jsonl:3: missing key\(s\) \['id'\]"):
        common.read_jsonl(path, required=("id",))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        common.read_jsonl(tmp_path / "nope.jsonl")


def test_append_jsonl_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "e.jsonl"
    common.append_jsonl(path, [{"a": 1}, {"a": float("nan")}])
    with open(path, "a") as f:
        f.write('{"a": 3')  # a run killed mid-write
    assert common.read_jsonl_resumable(path) == [{"a": 1}, {"a": None}]
    common.append_jsonl(path, [{"a": 4}])
    assert [r["a"] for r in common.read_jsonl(path)] == [1, None, 4]


@pytest.mark.slow
def test_smollm2_loads_offline_and_answers():
    model, tok = common.load_model("smollm2-135m")
    ids = common.chat_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])
    out = common.generate(model, tok, [ids], max_new_tokens=16, temperature=0.0)[0]
    assert out.finished and "Paris" in out.text


def test_repeated_prompts_share_one_prefill_and_match_unshared(tiny):
    model, tok = tiny
    a, b = _ids(tok, PROMPTS[:2])
    shared = common.generate(model, tok, [a, a, b, a, b], max_new_tokens=6, temperature=0.0, batch_size=5)
    for p, s in zip([a, a, b, a, b], shared):
        alone = common.generate(model, tok, [p], max_new_tokens=6, temperature=0.0)[0]
        assert s.prompt_ids == p and s.response_ids == alone.response_ids
        torch.testing.assert_close(torch.tensor(s.logprobs), torch.tensor(alone.logprobs), atol=1e-5, rtol=0)


def test_a_run_dir_loads_its_newest_checkpoint(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "config.json").write_text("{}")  # every run dir holds its settings as config.json
    with pytest.raises(FileNotFoundError, match="holds no model"):
        common.load_model(str(tmp_path))
    common.save_checkpoint(tmp_path / "ckpt", 1, model, tok)
    loaded, loaded_tok = common.load_model(str(tmp_path))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert len(loaded_tok) == len(tok)


def _head_model(kind: str, **head):
    """A one-layer random HF LM of another family, with the head settings given (logit scale, soft-capping)."""
    import transformers
    cls, cfg = {"cohere": ("CohereForCausalLM", "CohereConfig"), "granite": ("GraniteForCausalLM", "GraniteConfig"),
                "gemma2": ("Gemma2ForCausalLM", "Gemma2Config")}[kind]
    config = getattr(transformers, cfg)(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=8, **head)
    torch.manual_seed(0)
    return getattr(transformers, cls)(config).eval()


@pytest.mark.parametrize("kind, head", [("cohere", {"logit_scale": 0.25}), ("granite", {"logits_scaling": 4.0}),
                                        ("gemma2", {"final_logit_softcapping": None})])
def test_token_logprobs_score_the_models_own_logits(kind, head):
    lm = _head_model(kind, **head)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    attn, loss = torch.ones_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    loss[:, 3:] = True
    with torch.no_grad():
        logp, _ = common.TokenLogprobs(lm)(ids, attn, loss, temperature=0.7)
        own = torch.log_softmax(lm(input_ids=ids).logits[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None])
    torch.testing.assert_close(logp[:, 3:], own[:, 2:, 0], rtol=1e-5, atol=1e-5)


def test_token_logprobs_refuse_heads_beyond_a_matmul():
    with pytest.raises(ValueError, match="Gemma2ForCausalLM: config final_logit_softcapping=30"):
        common.TokenLogprobs(_head_model("gemma2", final_logit_softcapping=30.0))
    lm = _head_model("granite")
    lm.set_output_embeddings(torch.nn.Linear(16, 96, bias=True))
    with pytest.raises(ValueError, match="GraniteForCausalLM: its lm_head has a bias"):
        common.TokenLogprobs(lm)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_logprobs_equal_each_sequence_alone(tiny, side):
    """TokenLogprobs drops a right-padding mask (causality already hides the pads) and keeps any other one: either
    way every real token scores what it scores without padding."""
    model, tok = tiny
    seqs = _ids(tok, PROMPTS)
    scorer = common.TokenLogprobs(model)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[b, cols], attn[b, cols] = torch.tensor(s), 1
    loss = attn.bool() & (attn.cumsum(-1) > 1)   # every real token but the first
    with torch.no_grad():
        batched, _ = scorer(ids, attn, loss)
        for b, s in enumerate(seqs):
            alone, _ = scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long),
                              torch.arange(len(s))[None] > 0)
            torch.testing.assert_close(batched[b][loss[b]], alone[0, 1:], atol=1e-5, rtol=0)


def test_length_grouped_order_is_a_seeded_permutation_with_less_padding():
    rng = random.Random(0)
    lengths = [rng.randint(50, 700) for _ in range(203)]
    order = common.length_grouped_order(lengths, 8, seed=1, epoch=2)
    assert sorted(order) == list(range(203)) and order == common.length_grouped_order(lengths, 8, seed=1, epoch=2)
    assert order != common.length_grouped_order(lengths, 8, seed=1, epoch=3)

    def padded(o):   # tokens computed by the full batches when each is padded to its longest
        return sum(8 * max(lengths[i] for i in o[b:b + 8]) for b in range(0, 200, 8))
    assert padded(order) < 0.85 * padded(common.epoch_order(203, 1, 2))
    assert set(order[200:]) == set(common.epoch_order(203, 1, 2)[200:])   # the dropped partial batch is unchanged
