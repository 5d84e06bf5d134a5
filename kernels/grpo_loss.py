"""The clipped GRPO surrogate with optional k3 KL and truncated importance weights, fused: one pass per sequence
computes each token's loss and its d(loss)/d(logp); backward only scales that.

Per token (verl's compute_policy_loss + kl_penalty("low_var_kl")):
    ratio = exp(clamp(logp - old_logp, -20, 20))
    pg    = max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high)) * is_weight
    kl    = clamp(exp(d) - d - 1, -10, 10) with d = clamp(ref_logp - logp, -20, 20)     (k3, Schulman 2020)
    loss  = sum over the masked tokens of (pg + beta * kl) * row_weight[sequence]
The caller's row weights aggregate: 1/#tokens for a token mean, 1/(B * length) for the mean of per-sequence means,
1/(B * T) for Dr. GRPO's constant budget; train_rwml.grpo_loss gives them over the whole step's batch, and is the
PyTorch statement of the same objective this kernel fuses (tests/test_trainer_math.py holds the two equal).
Stats, sums over the masked tokens (detached 0-d tensors: no GPU sync unless the caller asks with .item()):
clipped_low (A < 0, ratio < 1 - clip_low: the clip zeroes the gradient), clipped_high (A > 0, ratio > 1 + clip_high),
ratio_sum, kl_sum (0 without ref_logp).
"""
import torch
import triton
import triton.language as tl

from kernels import use_triton

STATS = ("clipped_low", "clipped_high", "ratio_sum", "kl_sum")


@triton.jit
def _grpo_loss_kernel(logp_ptr, old_ptr, ref_ptr, adv_ptr, mask_ptr, isw_ptr, row_w_ptr, grad_ptr, out_ptr,
                      B, T, clip_low, clip_high, beta, HAS_REF: tl.constexpr, HAS_ISW: tl.constexpr,
                      BLOCK_T: tl.constexpr):
    # One program per sequence. out [5, B]: weighted loss sum, #clipped low, #clipped high, ratio sum, kl sum.
    row = tl.program_id(0)
    base = row.to(tl.int64) * T
    cols = tl.arange(0, BLOCK_T)
    a = tl.load(adv_ptr + row).to(tl.float32)
    w = tl.load(row_w_ptr + row)  # the aggregation's weight for this sequence's tokens (fp32)
    loss = 0.0
    n_low = 0.0
    n_high = 0.0
    ratio_sum = 0.0
    kl_sum = 0.0
    for start in range(0, T, BLOCK_T):
        idx = start + cols
        m = tl.load(mask_ptr + base + idx, mask=idx < T, other=0.0)
        on = m != 0  # masked tokens load as zeros: finite whatever the padding holds
        logp = tl.load(logp_ptr + base + idx, mask=on, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + base + idx, mask=on, other=0.0).to(tl.float32)
        log_ratio = logp - old
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
        d_ratio = tl.where((log_ratio >= -20.0) & (log_ratio <= 20.0), ratio, 0.0)  # d ratio / d logp
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        unclipped_wins = -a * ratio >= -a * clipped  # the max picks the unclipped term: gradient flows
        pg = tl.maximum(-a * ratio, -a * clipped)
        d_pg = tl.where(unclipped_wins, -a * d_ratio, 0.0)
        if HAS_ISW:
            isw = tl.load(isw_ptr + base + idx, mask=on, other=0.0).to(tl.float32)
            pg = pg * isw
            d_pg = d_pg * isw
        kl = tl.zeros_like(pg)
        d_kl = tl.zeros_like(pg)
        if HAS_REF:
            d = tl.load(ref_ptr + base + idx, mask=on, other=0.0).to(tl.float32) - logp
            d_c = tl.minimum(tl.maximum(d, -20.0), 20.0)
            e = tl.exp(d_c)
            kl_raw = e - d_c - 1.0
            kl = tl.minimum(kl_raw, 10.0)  # k3 >= 0, so only the upper clamp ever bites
            d_kl = tl.where((d >= -20.0) & (d <= 20.0) & (kl_raw <= 10.0), 1.0 - e, 0.0)
        mw = m * w
        loss += tl.sum((pg + beta * kl) * mw, 0)
        tl.store(grad_ptr + base + idx, (d_pg + beta * d_kl) * mw, mask=idx < T)
        n_low += tl.where(a < 0, tl.sum(tl.where(ratio < 1.0 - clip_low, m, 0.0), 0), 0.0)
        n_high += tl.where(a > 0, tl.sum(tl.where(ratio > 1.0 + clip_high, m, 0.0), 0), 0.0)
        ratio_sum += tl.sum(ratio * m, 0)
        kl_sum += tl.sum(kl * m, 0)
    tl.store(out_ptr + row, loss)
    tl.store(out_ptr + B + row, n_low)
    tl.store(out_ptr + 2 * B + row, n_high)
    tl.store(out_ptr + 3 * B + row, ratio_sum)
    tl.store(out_ptr + 4 * B + row, kl_sum)


class _FusedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old_logp, ref_logp, adv, mask, row_weight, is_weight, clip_low, clip_high, beta):
        b, t = logp.shape
        mask = mask.to(torch.float32).contiguous()
        grad = torch.empty(b, t, dtype=torch.float32, device=logp.device)
        out = torch.empty(5, b, dtype=torch.float32, device=logp.device)
        _grpo_loss_kernel[(b,)](
            logp, old_logp, logp if ref_logp is None else ref_logp, adv, mask,
            logp if is_weight is None else is_weight, row_weight.to(torch.float32).contiguous(), grad, out, b, t,
            clip_low, clip_high, beta, HAS_REF=ref_logp is not None, HAS_ISW=is_weight is not None,
            BLOCK_T=min(triton.next_power_of_2(t), 1024))
        ctx.save_for_backward(grad)
        ctx.logp_dtype = logp.dtype
        stats = out[1:].sum(1)
        ctx.mark_non_differentiable(stats)
        return out[0].sum(), stats

    @staticmethod
    def backward(ctx, g_loss, g_stats):
        (grad,) = ctx.saved_tensors
        return (grad * g_loss).to(ctx.logp_dtype), None, None, None, None, None, None, None, None, None


def grpo_loss(logp, old_logp, ref_logp, adv, mask, row_weight, clip_low=0.2, clip_high=0.2, beta=0.0,
              is_weight=None):
    """logp, old_logp, ref_logp (or None), mask, is_weight (or None) [B, T]; adv, row_weight [B] -> (loss, stats
    dict of sums). Gradient flows to logp only; old_logp, ref_logp, adv, row_weight and is_weight (truncated
    importance weights that multiply the policy term) are constants. Formulas: module docstring."""
    if logp.dim() != 2 or logp.numel() == 0:
        raise ValueError(f"grpo_loss: logp [B, T] expected, got {tuple(logp.shape)}")
    named = {"old_logp": old_logp, "ref_logp": ref_logp, "mask": mask, "is_weight": is_weight}
    for name, x in named.items():
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"grpo_loss: {name} must have logp's shape {tuple(logp.shape)}, got {tuple(x.shape)}")
    for name, x in (("adv", adv), ("row_weight", row_weight)):
        if x.shape != logp.shape[:1]:
            raise ValueError(f"grpo_loss: {name} [{logp.shape[0]}] expected, got {tuple(x.shape)}")
    consts = [None if x is None else x.detach().contiguous() for x in (old_logp, ref_logp, adv, row_weight, is_weight)]
    if use_triton(*[x for x in (logp, mask, *consts) if x is not None]):
        loss, stats = _FusedGRPOLoss.apply(logp.contiguous(), *consts[:3], mask, *consts[3:], clip_low, clip_high,
                                           beta)
    else:
        loss, stats = grpo_loss_reference(logp, *consts[:3], mask, consts[3], clip_low, clip_high, beta, consts[4])
    return loss, dict(zip(STATS, stats.unbind()))


def grpo_loss_reference(logp, old_logp, ref_logp, adv, mask, row_weight, clip_low=0.2, clip_high=0.2, beta=0.0,
                        is_weight=None):
    """Plain PyTorch autograd version -> (loss, stats [4] in STATS order); the float64 reference of the tests."""
    acc = torch.promote_types(logp.dtype, torch.float32)
    m, a = mask.to(acc), adv.to(acc)[:, None]
    on = m != 0
    logp = logp.to(acc)
    ratio = torch.where(on, logp - old_logp.to(acc), 0.0).clamp(-20, 20).exp()
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_low, 1 + clip_high))
    if is_weight is not None:
        pg = pg * is_weight.to(acc)
    kl = torch.zeros_like(pg)
    if ref_logp is not None:
        d = torch.where(on, ref_logp.to(acc) - logp, 0.0).clamp(-20, 20)
        kl = (d.exp() - d - 1).clamp(-10, 10)
    loss = ((pg + beta * kl) * m * row_weight.to(acc)[:, None]).sum()
    with torch.no_grad():
        low, high = (a < 0) & (ratio < 1 - clip_low), (a > 0) & (ratio > 1 + clip_high)
        stats = torch.stack([(m * low).sum(), (m * high).sum(), (m * ratio).sum(), (m * kl).sum()])
    return loss, stats
