"""Training hot path: fused log-probs, group advantages, clipped GRPO loss (Triton + PyTorch reference each).

Dispatch: Triton when every tensor is on CUDA, the PyTorch reference otherwise. RWML_KERNELS=triton|torch
forces one (read at every call); forcing triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is
first imported (tests/conftest.py does it). This package imports nothing from the rest of the repo.
"""
import os

import torch


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run on these tensors (see the module docstring)."""
    forced = os.environ.get("RWML_KERNELS", "")
    if forced not in ("", "triton", "torch"):
        raise ValueError(f"RWML_KERNELS={forced!r}: expected 'triton', 'torch' or unset")
    on_cuda = all(t.is_cuda for t in tensors)
    if forced == "triton" and not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("RWML_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return forced == "triton" or (forced == "" and on_cuda)


# The kernel modules import use_triton from here, so they come after it.
from kernels.advantages import group_advantages  # noqa: E402
from kernels.grpo_loss import grpo_loss  # noqa: E402
from kernels.logprobs import token_logprobs  # noqa: E402

__all__ = ["token_logprobs", "group_advantages", "grpo_loss", "use_triton"]
