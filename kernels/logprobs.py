"""Fused lm-head + log-softmax + gather (+ entropy): per-token log-probs without ever holding [N, V] logits.

logp[i] = log_softmax(hidden[i] @ weight.T / T)[targets[i]] and entropy[i] is the entropy of that same
distribution: the sampler's distribution under temperature T.

Rows go `chunk` at a time. Forward: one matmul gives the [c, V] logits chunk (fp32), a row op turns it into
(logp, logsumexp, entropy): on Triton one pass with an online logsumexp over vocabulary blocks, on the torch
path ATen's fused log_softmax. Backward recomputes each chunk's logits and turns them (in place on Triton) into
    dlogits = (g_logp * (onehot - p) - g_ent * p * (log p + H)) / T
then dhidden[chunk] = dlogits @ W and dW += dlogits.T @ hidden[chunk]. Extra memory: one fp32 [c, V] chunk
(two on the torch path) plus the [V, H] dW accumulator, fp32 whatever the weight's dtype (bf16 weights: plus one
bf16 [V, H] chunk product) — O(chunk x V), never O(N x V). The price is one more [N, H] x [H, V] matmul than the
naive path (the recompute).
"""
import os

import torch
import triton
import triton.language as tl

from kernels import use_triton

CHUNK_ELEMENTS = 1 << 24  # default rows per chunk = CHUNK_ELEMENTS // V: a 64 MiB fp32 chunk (341 rows at V=49152)


def _configs():
    # The interpreter runs one program at a time on numpy: one config, big enough blocks to stay quick.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_V": 512})]
    return [triton.Config({"BLOCK_V": b}, num_warps=w) for b in (1024, 2048, 4096) for w in (4, 8)]


@triton.autotune(configs=_configs(), key=["V"])
@triton.jit
def _row_forward_kernel(logits_ptr, targets_ptr, logp_ptr, lse_ptr, ent_ptr, V, stride, inv_temp,
                        WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    # One program per row of the [c, V] chunk; one pass over the vocabulary in BLOCK_V blocks.
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK_V)
    m = -1e30  # running max; finite, so (m - m_new) * s is 0 (not nan) on the first block
    s = 0.0    # sum exp(x - m)
    t = 0.0    # sum exp(x - m) * (x - m): entropy = log s - t / s, no cancellation at |x| ~ 1e4
    for start in range(0, V, BLOCK_V):
        valid = start + cols < V
        x = tl.load(base + start + cols, mask=valid, other=-float("inf")).to(tl.float32) * inv_temp
        m_new = tl.maximum(m, tl.max(x, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        if WITH_ENTROPY:
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(valid, x - m_new, 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    x_target = tl.load(base + target).to(tl.float32) * inv_temp
    tl.store(logp_ptr + row, x_target - lse)
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(ent_ptr + row, tl.log(s) - t / s)


@triton.autotune(configs=_configs(), key=["V"], restore_value=["logits_ptr"])  # in place: restore between trials
@triton.jit
def _row_backward_kernel(logits_ptr, targets_ptr, lse_ptr, g_logp_ptr, ent_ptr, g_ent_ptr, V, stride, inv_temp,
                         WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    # Overwrites the row's raw logits with d(loss)/d(raw logits). Without entropy, ent/g_ent point at stand-ins.
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_logp_ptr + row)
    ent = tl.load(ent_ptr + row)
    g_ent = tl.load(g_ent_ptr + row)
    target = tl.load(targets_ptr + row)
    for start in range(0, V, BLOCK_V):
        idx = start + cols
        valid = idx < V
        logq = tl.load(base + idx, mask=valid, other=0.0).to(tl.float32) * inv_temp - lse
        p = tl.exp(logq)
        d = tl.where(idx == target, g, 0.0) - g * p
        if WITH_ENTROPY:
            d -= g_ent * p * (logq + ent)  # dH/dx = -p (log p + H)
        tl.store(base + idx, d * inv_temp, mask=valid)


def _row_forward(logits, targets, inv_temp, logp, lse, ent, triton_path):
    """logits [c, V] (chunk buffer, may be clobbered) -> writes logp, lse, ent (None = skip) [c]."""
    if triton_path:
        _row_forward_kernel[(logits.shape[0],)](
            logits, targets, logp, lse, lse if ent is None else ent, logits.shape[1], logits.stride(0), inv_temp,
            WITH_ENTROPY=ent is not None)
        return
    x = logits.mul_(inv_temp) if inv_temp != 1.0 else logits
    logq = torch.log_softmax(x, -1)  # one fused ATen kernel; torch.logsumexp is several passes
    logp.copy_(logq.gather(1, targets[:, None]).squeeze(1))
    # Read off at the argmax, where log q = -log(sum exp(x - max)) is small: exact to ulp(max) at |x| ~ 1e4.
    lse.copy_(x.amax(-1) - logq.amax(-1))
    if ent is not None:
        ent.copy_(torch.exp(logq, out=x).mul_(logq).sum(-1).neg_())


def _row_backward(logits, targets, lse, g_logp, ent, g_ent, inv_temp, triton_path):
    """logits [c, V] raw chunk -> d(loss)/d(logits) [c, V] (in place on the Triton path)."""
    if triton_path:
        _row_backward_kernel[(logits.shape[0],)](
            logits, targets, lse, g_logp, lse if ent is None else ent, g_logp if g_ent is None else g_ent,
            logits.shape[1], logits.stride(0), inv_temp, WITH_ENTROPY=g_ent is not None)
        return logits
    x = logits.mul_(inv_temp) if inv_temp != 1.0 else logits
    p = torch.softmax(x, -1)
    g = g_logp[:, None] * inv_temp  # the chain rule's 1/T folded into the per-row scalars
    if g_ent is not None:
        d = x.sub_(lse[:, None]).add_(ent[:, None]).mul_(p).mul_(g_ent[:, None] * -inv_temp)
        d.sub_(p.mul_(g))
    else:
        d = p.mul_(-g)
    return d.scatter_add_(1, targets[:, None], g)


def _chunk_logits(h, w, buf):
    """[c, V] logits of hidden rows h into the reused buffer (no fresh [c, V] allocation per chunk)."""
    out = buf[: h.shape[0]]
    if h.dtype == out.dtype:
        return torch.mm(h, w.T, out=out)
    return out.copy_(h @ w.T)  # bf16 matmul (fp32 accumulation inside), logits rounded once like the HF lm_head


class _FusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_temp, chunk, with_entropy, triton_path):
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        # Triton computes in fp32; the torch path keeps float64 so the float64 gradcheck holds.
        acc = torch.float32 if triton_path else torch.promote_types(mm_dtype, torch.float32)
        h, w = hidden.to(mm_dtype), weight.to(mm_dtype)
        n, v = h.shape[0], w.shape[0]
        buf = torch.empty(min(chunk, n), v, dtype=acc, device=h.device)
        logp = torch.empty(n, dtype=acc, device=h.device)
        lse = torch.empty_like(logp)
        ent = torch.empty_like(logp) if with_entropy else None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            _row_forward(_chunk_logits(h[s:e], w, buf), targets[s:e], inv_temp, logp[s:e], lse[s:e],
                         None if ent is None else ent[s:e], triton_path)
        ctx.save_for_backward(hidden, weight, targets, lse, ent)
        ctx.config = (inv_temp, chunk, triton_path, acc)
        ctx.set_materialize_grads(False)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        inv_temp, chunk, triton_path, acc = ctx.config
        mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
        h, w = hidden.to(mm_dtype), weight.to(mm_dtype)
        n, v = h.shape[0], w.shape[0]
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(acc).contiguous()
        g_ent = None if g_ent is None else g_ent.to(acc).contiguous()
        need_dh, need_dw = ctx.needs_input_grad[:2]
        dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_dh else None  # mm(out=) rows
        # dW sums over every chunk: in fp32 (float64 stays float64), cast to the weight's dtype once at the end.
        # A bf16 accumulator would round the running sum once a chunk, and late chunks would vanish below its ulp.
        dw = torch.zeros(w.shape, dtype=torch.promote_types(w.dtype, torch.float32), device=w.device) \
            if need_dw else None
        buf = torch.empty(min(chunk, n), v, dtype=acc, device=h.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            d = _row_backward(_chunk_logits(h[s:e], w, buf), targets[s:e], lse[s:e], g_logp[s:e],
                              None if ent is None else ent[s:e], None if g_ent is None else g_ent[s:e],
                              inv_temp, triton_path).to(mm_dtype)
            if need_dh:
                torch.mm(d, w, out=dh[s:e])
            if need_dw:
                if dw.dtype == d.dtype:
                    dw.addmm_(d.T, h[s:e])
                else:  # bf16 matmul (fp32 inside), its output rounded once, then summed in fp32
                    dw.add_(d.T @ h[s:e])
            del d  # else this chunk's dlogits live on while the next chunk's are computed
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None, None, None)


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk=None, with_entropy=False):
    """Per-token log-probs (and entropies) of targets under softmax(hidden @ weight.T / temperature).

    hidden [N, H], weight [V, H] (the lm_head), targets [N] int -> (logp [N], entropy [N] or None), fp32
    (float64 for float64 inputs on the torch path). Autograd flows to hidden and weight. chunk = rows per
    [chunk, V] logits block (default CHUNK_ELEMENTS // V); smaller saves memory, larger feeds the matmul better.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype.is_floating_point:
        raise ValueError(f"token_logprobs: integer targets [{hidden.shape[0]}] expected, got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if ((targets < 0) | (targets >= weight.shape[0])).any():
        raise ValueError(f"token_logprobs: targets must lie in [0, {weight.shape[0]})")
    if temperature <= 0:
        raise ValueError(f"token_logprobs: temperature must be > 0, got {temperature}")
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    logp, ent = _FusedLogprobs.apply(hidden, weight, targets.long().contiguous(), 1.0 / temperature, chunk,
                                     with_entropy, use_triton(hidden, weight, targets))
    return logp, ent


def token_logprobs_reference(hidden, weight, targets, temperature=1.0, with_entropy=False):
    """The naive way, full [N, V] logits: float64 reference for the tests and the bench's baseline."""
    logits = (hidden @ weight.T).to(torch.promote_types(hidden.dtype, torch.float32)).div_(temperature)
    logq = torch.log_softmax(logits, -1)
    logp = logq.gather(1, targets.long()[:, None]).squeeze(1)
    return logp, (-(logq.exp() * logq).sum(-1) if with_entropy else None)
