"""kernels/: the Triton kernels (under TRITON_INTERPRET=1 here) and the PyTorch paths against float64 references."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels import group_advantages, grpo_loss, token_logprobs
from kernels.advantages import group_advantages_reference
from kernels.grpo_loss import grpo_loss_reference
from kernels.logprobs import token_logprobs_reference


@pytest.fixture(params=["torch", "triton"])
def path(request, monkeypatch):
    monkeypatch.setenv("RWML_KERNELS", request.param)
    return request.param


def rel_err(actual, expected):
    """Norm-relative error, so one tolerance fits values near 0 and values near 1e4."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-12)).item()


# ---------------------------------------------------------------- token_logprobs

LOGPROB_CASES = {  # name: (N, H, V, temperature, chunk, logit scale)
    "odd_vocab": (37, 24, 1500, 0.7, 16, 1.0),  # V not a multiple of the 512 block, last chunk short
    "one_row": (1, 16, 1000, 1.0, None, 1.0),
    "extreme": (20, 8, 1100, 1.0, 8, 1e4),  # logits around +-1e4
}


def logprob_inputs(n, h, v, scale, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64) * (scale * h**-0.5)
    targets = torch.randint(0, v, (n,), generator=gen)
    g_logp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_logp[::3] = 0  # rows the loss masks out
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    # Round to the tested dtype first: the reference then sees exactly the kernel's inputs.
    return hidden.to(dtype).double(), weight.to(dtype).double(), targets, g_logp, g_ent


def logprobs_and_grads(fn, hidden, weight, targets, g_logp, g_ent, **kw):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    logp, ent = fn(hidden, weight, targets, with_entropy=True, **kw)
    (logp.double() @ g_logp + ent.double() @ g_ent).backward()
    return logp, ent, hidden.grad, weight.grad


@pytest.mark.parametrize("case, dtype", [  # not extreme + bf16: bf16 logits near 1e4 are off by ~40
    ("odd_vocab", torch.float32), ("odd_vocab", torch.bfloat16), ("one_row", torch.float32),
    ("one_row", torch.bfloat16), ("extreme", torch.float32)])
def test_token_logprobs_match_float64_reference(path, case, dtype):
    n, h, v, temperature, chunk, scale = LOGPROB_CASES[case]
    hidden, weight, targets, g_logp, g_ent = logprob_inputs(n, h, v, scale, dtype, seed=len(case))
    expected = logprobs_and_grads(token_logprobs_reference, hidden, weight, targets, g_logp, g_ent,
                                  temperature=temperature)
    actual = logprobs_and_grads(token_logprobs, hidden.to(dtype), weight.to(dtype), targets, g_logp, g_ent,
                                temperature=temperature, chunk=chunk)
    assert actual[0].dtype == torch.float32 and actual[2].dtype == dtype and actual[3].dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5  # bf16: the matmuls round logits and gradients
    for name, a, e in zip(("logp", "entropy", "d_hidden", "d_weight"), actual, expected):
        assert torch.isfinite(a).all(), name
        if case == "extreme" and name == "entropy":  # ~0: one token takes all the mass
            assert a.abs().max() < 1e-3, name
        else:
            assert rel_err(a, e) < tol, (name, rel_err(a, e))


def test_token_logprobs_without_entropy(path):
    hidden, weight, targets, g_logp, _ = logprob_inputs(9, 8, 700, 1.0, torch.float32, seed=1)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    logp, ent = token_logprobs(hidden, weight, targets, chunk=4)
    assert ent is None
    logp.double().dot(g_logp).backward()
    expected = token_logprobs_reference(hidden.double(), weight.double(), targets)[0]
    assert rel_err(logp, expected) < 2e-5
    ref_h, ref_w = torch.autograd.grad(expected @ g_logp, [hidden, weight])
    assert rel_err(hidden.grad, ref_h) < 2e-5 and rel_err(weight.grad, ref_w) < 2e-5


def test_token_logprobs_bf16_weight_grad_sums_in_fp32(path):
    """bf16 lm_head (FSDP2's compute dtype): dW sums 128 chunks. Rows alike and one target make the chunk terms
    add up, so a bf16 running sum (one rounding per chunk) drifts ~10x further from float64 than the bound."""
    n, h, v, chunk = 512, 16, 64, 4
    gen = torch.Generator().manual_seed(7)
    hidden = (1 + 0.1 * torch.randn(n, h, generator=gen)).bfloat16()
    weight = (0.1 * torch.randn(v, h, generator=gen)).bfloat16()
    targets = torch.zeros(n, dtype=torch.long)
    w64 = weight.double().requires_grad_()
    token_logprobs_reference(hidden.double(), w64, targets)[0].sum().backward()
    w = weight.clone().requires_grad_()
    token_logprobs(hidden, w, targets, chunk=chunk)[0].sum().backward()
    assert w.grad.dtype == torch.bfloat16
    bound = 4e-3  # the final bf16 cast alone: ~1e-3
    assert rel_err(w.grad, w64.grad) < bound, rel_err(w.grad, w64.grad)
    with torch.no_grad():  # the same chunk terms summed in bf16, as before: outside the bound
        dlogits = torch.nn.functional.one_hot(targets, v) - torch.softmax(hidden.double() @ weight.double().T, -1)
        bf16_sum = torch.zeros(v, h, dtype=torch.bfloat16)
        for s in range(0, n, chunk):
            bf16_sum += dlogits[s:s + chunk].bfloat16().T @ hidden[s:s + chunk]
    assert rel_err(bf16_sum, w64.grad) > 2 * bound


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any ATen op returns (the interpreter copies raw bytes)."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_token_logprobs_never_materialise_n_by_v(path):
    n, h, v, chunk = 64, 8, 1000, 8
    hidden, weight, targets, g_logp, g_ent = logprob_inputs(n, h, v, 1.0, torch.float32, seed=2)
    hidden, weight = hidden.float().requires_grad_(), weight.float().requires_grad_()
    with LargestTensor() as mode:
        logp, ent = token_logprobs(hidden, weight, targets, chunk=chunk, with_entropy=True)
        (logp.double() @ g_logp + ent.double() @ g_ent).backward()
    assert mode.largest <= 4 * max(chunk * v, v * h) < 4 * n * v  # fp32 [chunk, V] logits, [V, H] dW


def test_float64_references_pass_gradcheck(monkeypatch):
    monkeypatch.setenv("RWML_KERNELS", "torch")
    hidden, weight, targets, _, _ = logprob_inputs(5, 4, 7, 3.0, torch.float64, seed=3)
    hidden.requires_grad_()
    weight.requires_grad_()
    for fn, kw in ((token_logprobs_reference, {}), (token_logprobs, {"chunk": 2})):  # the naive one, the chunked one
        assert torch.autograd.gradcheck(
            lambda a, b, fn=fn, kw=kw: fn(a, b, targets, temperature=0.7, with_entropy=True, **kw), (hidden, weight))
    logp, old, ref, adv, mask, is_weight = grpo_inputs(3, 6, torch.float64, seed=3)
    old = old.clamp(logp - 3, logp + 3)  # outside the clip, but not at ratio e^20 where finite differences drown
    for agg in AGGREGATIONS:
        row_w = row_weights(mask, agg).double()
        assert torch.autograd.gradcheck(
            lambda x, w=row_w: grpo_loss_reference(x, old, ref, adv, mask, w, 0.2, 0.28, 0.1, is_weight)[0],
            (logp.requires_grad_(),))


def test_token_logprobs_bad_input(path):
    hidden, weight = torch.randn(4, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match="targets must lie in"):
        token_logprobs(hidden, weight, torch.tensor([0, 1, 50, 2]))
    with pytest.raises(ValueError, match="hidden"):
        token_logprobs(hidden, torch.randn(50, 9), torch.zeros(4, dtype=torch.long))


def test_kernel_choice_env(monkeypatch):
    monkeypatch.setenv("RWML_KERNELS", "cuda")
    with pytest.raises(ValueError, match="RWML_KERNELS"):
        group_advantages(torch.zeros(4), 2)


# ---------------------------------------------------------------- group_advantages

@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_advantages_match_reference(path, scale, dtype):
    rewards = torch.rand(7 * 5, generator=torch.Generator().manual_seed(4)).to(dtype)
    actual = group_advantages(rewards, 5, scale)
    r = rewards.double().view(7, 5)
    centred = r - r.mean(1, keepdim=True)
    expected = centred / (r.std(1, keepdim=True) + 1e-6) if scale == "std" else centred  # torch.std: unbiased
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected.view(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(group_advantages_reference(rewards.double(), 5, scale), expected.view(-1))


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_degenerate_groups(path, scale):
    equal = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0])
    assert torch.equal(group_advantages(equal, 3, scale)[:6], torch.zeros(6))  # exactly, not 1e-17 / eps
    assert group_advantages(equal, 3, scale)[6:].abs().min() > 0.3
    assert torch.equal(group_advantages(equal, 1, scale), torch.zeros(9))  # no baseline: zero, not nan
    assert torch.equal(group_advantages(torch.tensor([True, False, True, True]), 2, scale)[2:], torch.zeros(2))
    with pytest.raises(ValueError, match="G=4"):
        group_advantages(equal, 4, scale)


# ---------------------------------------------------------------- grpo_loss

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def row_weights(mask, agg):
    """The per-sequence token weight of each aggregation over this batch (train_rwml.grpo_loss gives the same over
    a whole step): token mean, mean of per-sequence token means, token sums over T = the padded length."""
    b, t = mask.shape
    if agg == "token-mean":
        return torch.full((b,), 1.0 / max(int(mask.sum()), 1))
    if agg == "seq-mean-token-mean":
        return 1.0 / (b * mask.sum(1).clamp(min=1))
    return torch.full((b,), 1.0 / (b * t))


def grpo_inputs(b, t, dtype, seed):
    """b >= 3: rows 0 and 1 (full length, advantages of both signs) carry every clamp region; the last row is
    fully masked."""
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    ref = logp + 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64)
    n = min(t, 6)
    # log-ratios beyond the exp clamp (+-20), beyond both clip bounds, inside them
    old[:2, :n] = logp[:2, :n] - torch.tensor([30.0, -30.0, 2.0, -2.0, 0.1, -0.1], dtype=torch.float64)[:n]
    # ref - logp beyond the +-20 clamp, k3 above its clamp at 10 on both sides (e^3 - 4, e^-12 + 11), plain
    ref[:2, :n] = logp[:2, :n] + torch.tensor([25.0, -25.0, 3.0, -12.0, 0.5, -0.5], dtype=torch.float64)[:n]
    adv = torch.randn(b, generator=gen, dtype=torch.float64)
    adv[:2] = torch.tensor([1.3, -0.7])
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    lengths[:2] = t
    mask = torch.arange(t)[None] < lengths[:, None]
    mask[-1] = False  # a fully masked sequence
    is_weight = torch.rand(b, t, generator=gen, dtype=torch.float64) * 2
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in (logp, old, ref, adv, mask, is_weight))


def plain_grpo_loss(logp, old, ref, adv, mask, clip_low, clip_high, beta, agg, is_weight):
    """float64, a sequence at a time, from the formulas in kernels/grpo_loss.py's docstring (PPO's pessimistic
    min(r A, clip(r) A)), written apart from grpo_loss_reference so that a slip in the reference shows."""
    logp, old, adv = logp.double(), old.double(), adv.double()
    per_seq, n_low, n_high, ratio_sum, kl_sum = [], 0.0, 0.0, 0.0, 0.0
    for b in range(logp.shape[0]):
        on = mask[b].bool()
        lp, a = logp[b][on], adv[b]
        r = torch.exp(torch.clamp(lp - old[b][on], -20, 20))
        term = -torch.minimum(r * a, torch.clamp(r, 1 - clip_low, 1 + clip_high) * a)
        if is_weight is not None:
            term = term * is_weight[b][on].double()
        kl = torch.zeros_like(term)
        if ref is not None:
            d = torch.clamp(ref[b][on].double() - lp, -20, 20)
            kl = torch.clamp(torch.exp(d) - d - 1, max=10)
        per_seq.append(term + beta * kl)
        n_low += float(((r < 1 - clip_low) & (a < 0)).sum())
        n_high += float(((r > 1 + clip_high) & (a > 0)).sum())
        ratio_sum += float(r.detach().sum())
        kl_sum += float(kl.detach().sum())
    n_tokens = max(int(mask.sum()), 1)
    stats = torch.tensor([n_low, n_high, ratio_sum, kl_sum], dtype=torch.float64)
    if agg == "token-mean":
        loss = sum(x.sum() for x in per_seq) / n_tokens
    elif agg == "seq-mean-token-mean":
        loss = sum(x.sum() / max(len(x), 1) for x in per_seq) / len(per_seq)
    else:
        loss = sum(x.sum() / logp.shape[1] for x in per_seq) / len(per_seq)
    return loss, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("shape", [(5, 37), (3, 1100)])  # 1100: more than one 1024-token block
def test_grpo_loss_matches_float64_reference(path, agg, dtype, shape):
    logp, old, ref, adv, mask, is_weight = grpo_inputs(*shape, dtype, seed=5)
    x = logp.detach().requires_grad_()
    loss, stats = grpo_loss(x, old, ref, adv, mask, row_weights(mask, agg), 0.2, 0.28, 0.1, is_weight)
    loss.backward()
    x64 = logp.double().requires_grad_()
    loss64, stats64 = plain_grpo_loss(x64, old, ref, adv, mask, 0.2, 0.28, 0.1, agg, is_weight)
    loss64.backward()
    assert x.grad.dtype == dtype and set(stats) == {"clipped_low", "clipped_high", "ratio_sum", "kl_sum"}
    assert abs(loss.item() - loss64.item()) < 1e-5 * max(1.0, abs(loss64.item()))
    assert rel_err(x.grad, x64.grad) < (1e-2 if dtype == torch.bfloat16 else 1e-5)  # bf16: the grad's own rounding
    assert torch.all(x.grad[~mask] == 0)
    torch.testing.assert_close(torch.stack(list(stats.values())).double(), stats64, rtol=1e-5, atol=1e-5)


def test_grpo_loss_formulas(path):
    adv = torch.tensor([1.0, -1.0, 2.0])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.full((3, 4), -1.0)
    logp[~mask] = -float("inf")  # padding garbage must not leak into loss or gradient
    token_mean = row_weights(mask, "token-mean")
    # On policy, no KL: loss = -mean A over tokens, d loss / d logp = -A / #tokens.
    x = logp.clone().requires_grad_()
    loss, stats = grpo_loss(x, logp, logp, adv, mask, token_mean, beta=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(-(3 * 1 - 2 * 1 + 4 * 2) / 9)
    torch.testing.assert_close(x.grad, -adv[:, None].expand(3, 4) * mask / 9)
    assert stats["ratio_sum"].item() == pytest.approx(9) and stats["kl_sum"].item() == 0
    # The row weights aggregate: Dr. GRPO divides each sequence's token sum by T = 4, then averages sequences.
    loss, _ = grpo_loss(logp, logp, None, adv, mask, row_weights(mask, "seq-mean-token-sum-norm"))
    assert loss.item() == pytest.approx(-(3 * 1 - 2 * 1 + 4 * 2) / (3 * 4))
    # Original GRPO: per-sequence token mean, then the mean over sequences.
    loss, _ = grpo_loss(logp, logp, None, adv, mask, row_weights(mask, "seq-mean-token-mean"))
    assert loss.item() == pytest.approx(-(1 - 1 + 2) / 3)
    # Off policy: ratio e^1 with A > 0 and ratio e^-1 with A < 0 are clipped (no gradient); the others are not.
    old = torch.tensor([[-2.0, 0.0, -1, -1], [0.0, -2.0, -1, -1], [-1.0, -1, -1, -1]])
    x = logp.clone().requires_grad_()
    loss, stats = grpo_loss(x, old, None, adv, mask, token_mean)
    loss.backward()
    assert x.grad[0, 0] == 0 and x.grad[1, 0] == 0  # clipped: ratio e, A = 1; ratio 1/e, A = -1
    e = torch.exp(torch.tensor(1.0))
    torch.testing.assert_close(x.grad[:2, 1], torch.stack([-1 / e, e]) / 9)  # unclipped: -A ratio / #tokens
    assert stats["clipped_high"].item() == 1 and stats["clipped_low"].item() == 1
    # k3 KL: exp(d) - d - 1 with d = ref - logp, gradient 1 - exp(d).
    x = logp.clone().requires_grad_()
    ref = logp + 0.5
    loss, stats = grpo_loss(x, logp, torch.where(mask, ref, 0.0), torch.zeros(3), mask, token_mean, beta=1.0)
    loss.backward()
    k3 = torch.exp(torch.tensor(0.5)) - 1.5
    assert loss.item() == pytest.approx(k3.item()) and stats["kl_sum"].item() == pytest.approx(9 * k3.item())
    torch.testing.assert_close(x.grad, (1 - torch.exp(torch.tensor(0.5))) * mask / 9)
    # is_weight multiplies each token's policy term and its gradient, never the KL term.
    isw = torch.rand(3, 4, generator=torch.Generator().manual_seed(0)) + 0.5
    grads = []
    for w in (None, isw):
        x = logp.clone().requires_grad_()
        grpo_loss(x, old, None, adv, mask, token_mean, is_weight=w)[0].backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0] * isw * mask)
    kl_only = [grpo_loss(logp, logp, torch.where(mask, ref, 0.0), torch.zeros(3), mask, token_mean, beta=1.0,
                         is_weight=w)[0] for w in (None, isw)]
    torch.testing.assert_close(kl_only[1], kl_only[0])


def test_grpo_loss_bad_input(path):
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="row_weight"):
        grpo_loss(logp, logp, None, torch.zeros(2), logp > 0, torch.ones(3))
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, torch.zeros(2, 4), None, torch.zeros(2), logp > 0, torch.ones(2))
