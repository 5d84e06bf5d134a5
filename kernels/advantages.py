"""Group-relative advantages: GRPO's (r - mean) / (std + eps) per group, Dr. GRPO's r - mean (scale="none").

std is the unbiased one (torch.std, as verl and TRL use). Two deliberate departures:
- rewards are shifted by the group's first reward before averaging, so an all-equal group gives exact zeros
  (not 1e-17 / eps noise);
- a group of size 1 gives 0 (no baseline to compare with), where torch.std would give nan (TRL) and verl
  hands back the raw reward.
"""
import torch
import triton
import triton.language as tl

from kernels import use_triton

SCALES = ("std", "none")


@triton.jit
def _group_advantages_kernel(r_ptr, out_ptr, G, inv_g, inv_dof, eps, SCALE_STD: tl.constexpr,
                             BLOCK_G: tl.constexpr):
    # One program per group of G consecutive rewards; inv_dof = 1 / max(G - 1, 1) (unbiased variance).
    base = tl.program_id(0).to(tl.int64) * G
    offs = tl.arange(0, BLOCK_G)
    valid = offs < G
    r = tl.load(r_ptr + base + offs, mask=valid, other=0.0).to(tl.float32)
    r0 = tl.load(r_ptr + base).to(tl.float32)
    c = tl.where(valid, r - r0, 0.0)
    dev = tl.where(valid, c - tl.sum(c, 0) * inv_g, 0.0)
    if SCALE_STD:
        dev = dev / (tl.sqrt(tl.sum(dev * dev, 0) * inv_dof) + eps)
    tl.store(out_ptr + base + offs, dev, mask=valid)


def group_advantages(rewards, group_size, scale="std", eps=1e-6):
    """rewards [B*G] (each group's G responses consecutive) -> advantages [B*G], fp32 (float64 stays float64)."""
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"group_advantages: rewards [B*G] with G={group_size} expected, got {tuple(rewards.shape)}")
    if not use_triton(rewards):
        return group_advantages_reference(rewards, group_size, scale, eps)
    r = rewards.to(torch.float32).contiguous()
    out = torch.empty_like(r)
    _group_advantages_kernel[(r.numel() // group_size,)](
        r, out, group_size, 1.0 / group_size, 1.0 / max(group_size - 1, 1), eps, SCALE_STD=scale == "std",
        BLOCK_G=triton.next_power_of_2(group_size))
    return out


def group_advantages_reference(rewards, group_size, scale="std", eps=1e-6):
    r = rewards.reshape(-1, group_size).to(torch.promote_types(rewards.dtype, torch.float32))
    c = r - r[:, :1]
    dev = c - c.mean(1, keepdim=True)
    if scale == "std":
        dev = dev / ((dev.square().sum(1, keepdim=True) / max(group_size - 1, 1)).sqrt() + eps)
    return dev.reshape(-1)
