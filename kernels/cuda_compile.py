"""Compile every Triton kernel here for real CUDA GPUs (sm_80, sm_90) on a machine without one.

The interpreter (TRITON_INTERPRET=1, how the tests run the kernels) accepts code the real compiler rejects
(non-power-of-2 aranges, bf16 dots, layouts) and says nothing of registers or spills. So this module calls each
kernel's own Python wrapper on CPU stand-ins for the tensors it gets on CUDA (same dtypes, same row/chunk
slicing), records the launches instead of running them, and compiles each distinct launch x autotune config x
target with triton.compile exactly as the JIT would on a GPU: the JIT's own binder gives the signature,
constexprs and alignment attributes. ptxas's report gives registers and spills, Triton's metadata the shared
memory; occupancy follows from the per-SM limits below.

Needs TRITON_INTERPRET unset before triton is first imported (the interpreter swaps @triton.jit for a Python
function, and logprobs._configs keeps one small autotune config there): tests/test_kernels_compile.py runs it
in a subprocess. Report: python -m kernels.bench --compile-report.
"""
import contextlib
import io
import math
import os
import re
import sys
import tempfile
from unittest import mock

import torch

# name: (compute capability, shared memory per SM in bytes, max resident threads per SM)
TARGETS = {"sm_80": (80, 164 * 1024, 2048), "sm_90": (90, 228 * 1024, 2048)}
REGS_PER_SM = 65536
REG_UNIT = 256            # registers are allocated per warp in units of 256 (8 per thread)
MAX_WARPS_PER_SM = 64     # 2048 threads
MAX_BLOCKS_PER_SM = 32
SMEM_PER_BLOCK_RESERVED = 1024  # the driver keeps 1 KiB of shared memory per resident block (sm_80 and later)


def occupancy(regs: int, shared: int, num_warps: int, target: str) -> tuple[int, float]:
    """-> (resident blocks per SM, resident warps / max warps) for one kernel config on one target."""
    _, smem_per_sm, threads_per_sm = TARGETS[target]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / REG_UNIT) * REG_UNIT
    by_regs = REGS_PER_SM // regs_per_warp // num_warps
    by_threads = threads_per_sm // (32 * num_warps)
    by_smem = smem_per_sm // (shared + SMEM_PER_BLOCK_RESERVED)
    blocks = min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM)
    return blocks, blocks * num_warps / MAX_WARPS_PER_SM


def kernels_defined() -> dict:
    """Every Triton kernel object (JITFunction or Autotuner) defined in kernels/, by name."""
    import importlib

    import triton

    found = {}
    for module in ("kernels.logprobs", "kernels.grpo_loss", "kernels.advantages"):
        for name, obj in vars(importlib.import_module(module)).items():
            if isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                found[name] = obj
    return found


@contextlib.contextmanager
def _recorded_launches(launches: list):
    """Inside: every kernel launch appends (jit fn, autotune configs or None, args, kwargs) and runs nothing;
    the wrappers take the Triton path on CPU tensors (as if they were on CUDA)."""
    import triton

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append((self, None, args, kwargs))

    def autotuned_run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn, self.configs, args, kwargs))

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(triton.runtime.JITFunction, "run", jit_run))
        stack.enter_context(mock.patch.object(triton.runtime.Autotuner, "run", autotuned_run))
        for module in ("kernels.logprobs", "kernels.grpo_loss", "kernels.advantages"):
            stack.enter_context(mock.patch.object(sys.modules[module], "use_triton", lambda *tensors: True))
        yield


def _cases(full: bool):
    """(case label, function making the launches) with the dtypes and shapes the kernels get on CUDA.
    full=False: a representative subset (each kernel, each constexpr flag, both input dtypes)."""
    from kernels import group_advantages, grpo_loss, token_logprobs

    def logprobs(dtype, with_entropy, v):
        # chunk 3 of 8 rows: later chunks start at unaligned offsets of logp/lse/targets, as real chunks do
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(8, 16, generator=gen).to(dtype).requires_grad_()
        weight = torch.randn(v, 16, generator=gen).to(dtype).requires_grad_()
        logp, ent = token_logprobs(hidden, weight, torch.randint(0, v, (8,), generator=gen), 0.7, chunk=3,
                                   with_entropy=with_entropy)
        (logp.sum() + (ent.sum() if with_entropy else 0)).backward()

    def loss(dtype, t, with_ref, with_isw):
        logp = torch.zeros(3, t, dtype=dtype, requires_grad=True)
        ref = torch.zeros(3, t, dtype=dtype) if with_ref else None
        isw = torch.ones(3, t, dtype=dtype) if with_isw else None
        mask = torch.ones(3, t, dtype=torch.bool)
        grpo_loss(logp, logp.detach(), ref, torch.zeros(3, dtype=dtype), mask, torch.full((3,), 1.0 / (3 * t)), 0.2,
                  0.28, 0.01, is_weight=isw)

    def advantages(group_size, scale):
        group_advantages(torch.zeros(4 * group_size, dtype=torch.bfloat16), group_size, scale)

    # the [chunk, V] logits buffer is fp32 whatever the model dtype: bf16 models run the same row kernels
    vocabs = (151936, 49152, 32001) if full else (151936,)  # Qwen, SmolLM2, a V not a multiple of 16
    for v in vocabs:
        for ent in (True, False):
            yield f"logprobs bf16 V={v}{' +entropy' if ent else ''}", lambda v=v, ent=ent: logprobs(
                torch.bfloat16, ent, v)
    if full:
        yield "logprobs fp32 V=151936 +entropy", lambda: logprobs(torch.float32, True, 151936)
    lengths = (2000, 700, 300, 100, 37, 5) if full else (2000, 37)  # padded lengths -> BLOCK_T 1024 ... 8
    for dtype in (torch.float32, torch.bfloat16):
        for t in lengths:
            for with_ref in (True, False):
                for with_isw in ((True, False) if full or t == 2000 else (False,)):
                    yield (f"grpo_loss {str(dtype)[6:]} T={t}{' +ref' if with_ref else ''}"
                           f"{' +is_weight' if with_isw else ''}"), \
                        lambda d=dtype, t=t, r=with_ref, w=with_isw: loss(d, t, r, w)
    for group_size in ((2, 8, 16, 64) if full else (8,)):
        for scale in ("std", "none"):
            yield f"group_advantages G={group_size} {scale}", lambda g=group_size, s=scale: advantages(g, s)


def _ptxas_numbers(log: str, name: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"cuda_compile: no register/spill report from ptxas for {name}:\n{log}")
    return {"regs": int(regs.group(1)), "spill_stores": int(spill.group(1)), "spill_loads": int(spill.group(2))}


def _compile_one(fn, args, kwargs, backend, gpu):
    """Compile one launch as the JIT would on that GPU -> (specialization key, labels, metadata, ptxas log)."""
    import triton
    from triton.compiler import ASTSource
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    blocks = [f"{p.name}={bound[p.name]}" for p in fn.params if p.is_constexpr and p.name.startswith("BLOCK")]
    config = ", ".join(blocks + [f"{options.num_warps} warps"])
    flags = [f"{p.name}={bound[p.name]}" for p in fn.params if p.is_constexpr and not p.name.startswith("BLOCK")]
    unaligned = [p.name for p, (kind, attr) in zip(fn.params, spec) if kind[0] == "*" and attr != "D"]
    variant = ", ".join(flags + [f"{p.name} {kind[1:]}" for p, (kind, _) in zip(fn.params, spec)
                                 if kind[0] == "*" and kind[1:] in ("bf16", "fp16")])
    if unaligned:  # e.g. a later chunk's slice: the JIT compiles a variant without 16-byte alignment
        variant += f"; unaligned {', '.join(unaligned)}"
    key = (fn.__name__, str(spec), str(sorted(options.__dict__.items())))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # knobs.nvidia.dump_ptxas_log prints ptxas -v here
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    return key, config, variant, compiled, log.getvalue()


def compile_all(full: bool = True, targets=tuple(TARGETS)) -> list[dict]:
    """Compile every distinct specialization x autotune config the cases launch, for each target.
    -> one row per compile: kernel, config (BLOCK_* constexprs, warps), variant (other constexprs, bf16 inputs,
    unaligned pointers), case, target, regs, spill_stores, spill_loads (bytes per thread), shared (bytes),
    blocks_per_sm, occupancy, ptx_bytes, cubin_bytes. A compile error raises, naming kernel, case and target."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("cuda_compile needs TRITON_INTERPRET unset before triton is imported (run it in a "
                           "fresh process: python -m kernels.bench --compile-report)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    launches = []  # (case, jit fn, kwargs with one autotune config applied, args)
    for case, make in _cases(full):
        recorded = []
        with _recorded_launches(recorded):
            make()
        for fn, configs, args, kwargs in recorded:
            launches += [(case, fn, args, {**kwargs, **(c.all_kwargs() if c else {})}) for c in configs or [None]]

    rows, seen = [], set()
    with tempfile.TemporaryDirectory() as cache, \
            mock.patch.object(triton.knobs.cache, "dir", cache), \
            mock.patch.object(triton.knobs.compilation, "always_compile", True), \
            mock.patch.object(triton.knobs.nvidia, "dump_ptxas_log", True):
        for target in targets:
            gpu = GPUTarget("cuda", TARGETS[target][0], 32)
            backend = make_backend(gpu)
            for case, fn, args, kwargs in launches:
                try:
                    key, config, variant, compiled, log = _compile_one(fn, args, kwargs, backend, gpu)
                except Exception as e:
                    raise RuntimeError(f"cuda_compile: {fn.__name__} [{case}] {kwargs} does not compile for "
                                       f"{target}: {type(e).__name__}: {e}") from e
                if (target, key) in seen:  # the JIT compiles a specialization once, whichever case launches it
                    continue
                seen.add((target, key))
                row = {"kernel": fn.__name__, "config": config, "variant": variant, "case": case, "target": target,
                       **_ptxas_numbers(log, f"{fn.__name__} [{case}] for {target}"),
                       "shared": compiled.metadata.shared, "ptx_bytes": len(compiled.asm["ptx"]),
                       "cubin_bytes": len(compiled.asm["cubin"])}
                row["blocks_per_sm"], row["occupancy"] = occupancy(row["regs"], row["shared"],
                                                                   compiled.metadata.num_warps, target)
                rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of compile_all's rows, one line per kernel x config, the worst variant of each target
    (most registers, spills and shared memory, least occupancy)."""
    targets = list(dict.fromkeys(r["target"] for r in rows))
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["config"]), {}).setdefault(r["target"], []).append(r)
    head = " | ".join(f"{t}: regs, spill B, smem B, occupancy" for t in targets)
    lines = [f"| kernel | config | variants | {head} |", "|---|---|---|" + "---|" * len(targets)]
    for (kernel, config), by_target in groups.items():
        cells = []
        for t in targets:
            rs = by_target.get(t, [])
            cells.append(f"{max(r['regs'] for r in rs)}, {max(r['spill_stores'] + r['spill_loads'] for r in rs)}, "
                         f"{max(r['shared'] for r in rs)}, {min(r['occupancy'] for r in rs):.0%}" if rs else "-")
        n = max(len(rs) for rs in by_target.values())
        lines.append(f"| {kernel} | {config} | {n} | {' | '.join(cells)} |")
    return "\n".join(lines)
