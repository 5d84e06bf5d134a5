"""kernels/ compiled for real GPUs (sm_80, sm_90) without one: the interpreter that test_kernels.py runs accepts code
the CUDA compiler rejects (non-power-of-2 aranges, bf16 dots) and says nothing of registers or spills."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.cuda_compile import TARGETS, occupancy

ROOT = Path(__file__).resolve().parent.parent
# Triton is already imported here in interpreter mode (conftest.py): compile in a fresh process without it.
SCRIPT = """import json, triton
from kernels.cuda_compile import compile_all, kernels_defined
configs = {name: len(k.configs) if isinstance(k, triton.runtime.Autotuner) else 1
           for name, k in kernels_defined().items()}
print(json.dumps({"rows": compile_all(full=FULL), "configs": configs}))"""


def compile_rows(full: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT.replace("FULL", str(full))], cwd=ROOT, capture_output=True,
                         text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=1200, check=False)
    assert out.returncode == 0, out.stderr[-6000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_compiled(result: dict):
    rows, configs = result["rows"], result["configs"]
    assert set(configs) == {"_row_forward_kernel", "_row_backward_kernel", "_grpo_loss_kernel",
                            "_group_advantages_kernel"}  # a new kernel needs a case in cuda_compile._cases
    assert configs["_row_forward_kernel"] > 1  # the real autotune list, not the interpreter's single config
    for target in TARGETS:
        for name, n_configs in configs.items():
            mine = [r for r in rows if r["kernel"] == name and r["target"] == target]
            assert len({r["config"] for r in mine}) >= n_configs, (name, target)  # every autotune config
            assert all(r["regs"] > 0 and r["cubin_bytes"] > 0 and r["blocks_per_sm"] >= 1 for r in mine)
    # Both dtypes the loss accepts, and both entropy branches of the log-prob kernels.
    assert any("bf16" in r["variant"] for r in rows if r["kernel"] == "_grpo_loss_kernel")
    assert {"WITH_ENTROPY=True", "WITH_ENTROPY=False"} <= {r["variant"].split(";")[0] for r in rows
                                                           if r["kernel"] == "_row_forward_kernel"}
    # Every config here can be picked by default (the autotuner chooses among all; the others have one): no spills.
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling


def test_kernels_compile_for_sm80_and_sm90():
    """A representative subset: each kernel, every autotune config, both dtypes, both targets (~25 s CPU)."""
    check_compiled(compile_rows(full=False))


@pytest.mark.slow
def test_kernels_compile_every_variant():
    """Every case of the compile report (several vocabularies, padded lengths, group sizes; ~60 s CPU)."""
    check_compiled(compile_rows(full=True))


def test_occupancy_limits():
    assert occupancy(32, 0, 4, "sm_90") == (16, 1.0)       # threads bound: 2048 / 128
    assert occupancy(80, 0, 4, "sm_90") == (6, 0.375)      # 80 regs -> 2560 per warp -> 25 warps -> 6 blocks
    assert occupancy(255, 0, 4, "sm_80") == (2, 0.125)     # 8192 regs per warp
    assert occupancy(16, 100 * 1024, 4, "sm_80")[0] == 1   # shared memory bound: 164 KiB per SM
    assert occupancy(16, 100 * 1024, 4, "sm_90")[0] == 2   # 228 KiB per SM
