"""Benchmark: forward+backward of per-token log-probs + the GRPO loss, naive vs ours vs Liger-Kernel.

    python -m kernels.bench [--rounds 3] [--sizes smollm2,qwen3-8b]
    python -m kernels.bench --compile-report      (no GPU needed; TRITON_INTERPRET unset)

One table: for each size, median time and peak extra memory of (log-probs -> grpo_loss(token-mean, clip 0.2,
k3 KL beta=0.001) -> backward), and the ratios against the naive path (full [N, V] logits, log_softmax, gather).
Methods: naive | torch (our chunked path, RWML_KERNELS=torch) | triton (CUDA only) | liger
(LigerFusedLinearGRPOLoss, loss_type="dapo" = token-mean, when liger-kernel is installed).

Every measurement runs in a fresh subprocess: build inputs, one warm-up pass (torch.compile for Liger, lazy
init), then one measured pass. Rounds go round-robin over the methods, so load from other processes spreads
over all of them. "time" is wall clock; "CPU" is the process's CPU time over all its threads (user + sys),
steadier than wall time on a shared machine. Peak memory, CPU: the process's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs just before the measured pass) minus its resident set at that
moment, so it counts every byte the pass touched and not the inputs; glibc is told to mmap every allocation
>= 64 KiB so freed memory really leaves the process and the warm-up pass cannot hide it. CUDA:
torch.cuda.max_memory_allocated minus memory_allocated before the pass. Both include the gradients of hidden and
weight, which every method produces.
On CUDA a second table compares the Triton log-softmax row kernels with the device's copy bandwidth.
--compile-report compiles every Triton kernel x autotune config for sm_80 and sm_90 (kernels/cuda_compile.py) and
prints registers, spills, shared memory and occupancy instead.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SIZES = {  # name: (sequences B, response length T, hidden H, vocabulary V); N = B * T tokens
    "smollm2": (8, 512, 576, 49152),
    "qwen3-8b": (8, 512, 4096, 151936),
}
METHODS = ("naive", "torch", "triton", "liger")


def _skip_reason(method):
    """Why a method cannot run here (None = it can)."""
    if method == "triton" and not torch.cuda.is_available():
        return "CUDA only"
    if method == "liger":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
        except ImportError:
            return "liger-kernel not installed"
    return None


def _inputs(size, device):
    from kernels import token_logprobs

    b, t, h, v = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the dtypes common.load_model uses
    hidden = torch.randn(b * t, h, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, dtype).requires_grad_()
    targets = torch.randint(0, v, (b * t,), generator=gen).to(device)
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(device)
    with torch.no_grad():  # old/ref log-probs near the current ones, so the clip acts as in training
        base = token_logprobs(hidden, weight, targets)[0].view(b, t)
    old = base + 0.05 * torch.randn(b, t, generator=gen).to(device)
    ref = base + 0.05 * torch.randn(b, t, generator=gen).to(device)
    adv = torch.randn(b, generator=gen).to(device)
    return hidden, weight, targets, mask, old, ref, adv


def _step_fn(method, size, device):
    """A function running one forward+backward of `method`, and the tensors whose grads it fills."""
    from kernels import grpo_loss
    from kernels.grpo_loss import grpo_loss_reference
    from kernels.logprobs import token_logprobs, token_logprobs_reference

    b, t, _, _ = SIZES[size]
    hidden, weight, targets, mask, old, ref, adv = _inputs(size, device)
    token_mean = (1.0 / mask.sum()).expand(b).contiguous()   # the paper's aggregation (DAPO's token mean)
    if method == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        liger = LigerFusedLinearGRPOLoss(beta=0.001, epsilon_low=0.2, epsilon_high=0.2, loss_type="dapo")

        def step():
            loss = liger(hidden.view(b, t, -1), weight, targets.view(b, t), mask.float(), adv,
                         ref_per_token_logps=ref, old_per_token_logps=old)[0]
            loss.backward()
    else:
        os.environ["RWML_KERNELS"] = "torch" if method in ("naive", "torch") else "triton"
        logprobs = token_logprobs_reference if method == "naive" else token_logprobs
        loss_fn = grpo_loss_reference if method == "naive" else grpo_loss

        def step():
            logp = logprobs(hidden, weight, targets)[0].view(b, t)
            loss_fn(logp, old, ref, adv, mask, token_mean, beta=0.001)[0].backward()
    return step, (hidden, weight)


def _rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(method, size):
    """One warm-up and one measured forward+backward in this process -> {"time_s", "cpu_s", "peak_mib"}."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_grad_enabled(True)
    step, params = _step_fn(method, size, device)
    step()
    for p in params:
        p.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _rss_kib("VmRSS") * 1024
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_kib("VmHWM") * 1024
    return {"time_s": seconds, "cpu_s": cpu_seconds, "peak_mib": (peak - base) / 2**20}


def _run_worker(method, size):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-m", "kernels.bench", "--worker", method, "--sizes", size], env=env,
                         cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"bench worker {method}/{size} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bandwidth_table():
    """CUDA: Triton log-softmax row kernels vs the device's copy bandwidth (the floor for a one-pass kernel)."""
    from kernels.logprobs import _row_backward, _row_forward

    rows, v = 4096, SIZES["qwen3-8b"][3]
    logits = torch.randn(rows, v, device="cuda")
    targets = torch.randint(0, v, (rows,), device="cuda")
    logp, lse, g = (torch.empty(rows, device="cuda") for _ in range(3))

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    nbytes = logits.numel() * 4
    copy_bw = 2 * nbytes / timed(lambda: logits.clone())  # read + write
    fwd = timed(lambda: _row_forward(logits, targets, 1.0, logp, lse, None, True))
    bwd = timed(lambda: _row_backward(logits, targets, lse, g, None, None, 1.0, True))  # read + write
    print(f"\nTriton row kernels on fp32 logits [{rows}, {v}], copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    print("| kernel | time ms | GB/s | x bandwidth floor |\n|---|---|---|---|")
    for name, sec, traffic in (("forward (read)", fwd, nbytes), ("backward (read+write)", bwd, 2 * nbytes)):
        print(f"| {name} | {sec * 1e3:.2f} | {traffic / sec / 1e9:.0f} | {sec / (traffic / copy_bw):.2f} |")


def _compile_report():
    from kernels.cuda_compile import compile_all, format_table

    start = time.perf_counter()
    rows = compile_all(full=True)
    print(f"{len(rows)} compiles (every launch variant x autotune config x target) in "
          f"{time.perf_counter() - start:.0f} s; worst variant per cell; occupancy = resident warps / 64 per SM\n")
    print(format_table(rows))
    spilling = sorted({f"{r['kernel']} [{r['config']}; {r['variant']}] {r['target']}" for r in rows
                       if r["spill_stores"] or r["spill_loads"]})
    print("\nspills: " + ("; ".join(spilling) if spilling else "none"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default=None, help=f"comma-separated, from {list(SIZES)}; default: smollm2 on "
                        "CPU, all on CUDA")
    parser.add_argument("--rounds", type=int, default=3, help="measurements per method (median reported)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--compile-report", action="store_true", help="compile every kernel x autotune config "
                        "for sm_80/sm_90 (no GPU needed) and print registers, spills, shared memory, occupancy")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_report:
        _compile_report()
        return
    sizes = (args.sizes or ("smollm2,qwen3-8b" if torch.cuda.is_available() else "smollm2")).split(",")
    for name in sizes + args.methods.split(","):
        if name not in SIZES and name not in METHODS:
            parser.error(f"unknown size or method {name!r}")
    if args.worker:
        print(json.dumps(_measure(args.worker, sizes[0])))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device}; median of {args.rounds} fresh-process measurements\n")
    print("| size (N, H, V) | method | time s | x naive | CPU s | x naive | peak extra MiB | x naive |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        b, t, h, v = SIZES[size]
        runnable = [m for m in args.methods.split(",") if _skip_reason(m) is None]
        results = {m: [] for m in runnable}
        for _ in range(args.rounds):
            for m in runnable:
                results[m].append(_run_worker(m, size))
        label = f"{size} ({b * t}, {h}, {v})"
        summary = {m: (statistics.median(r["time_s"] for r in rs), statistics.median(r["cpu_s"] for r in rs),
                       max(r["peak_mib"] for r in rs)) for m, rs in results.items()}
        naive = summary.get("naive")
        for m in args.methods.split(","):
            if m not in summary:
                print(f"| {label} | {m} | unavailable: {_skip_reason(m)} | | | | | |")
                continue
            cells = [f"{v:.{digits}f} | " + (f"{v / naive[i]:.2f}" if naive else "-")
                     for i, (v, digits) in enumerate(zip(summary[m], (2, 2, 0)))]
            print(f"| {label} | {m} | {' | '.join(cells)} |", flush=True)
    if torch.cuda.is_available():
        _bandwidth_table()
    else:
        print("\nTriton log-softmax kernel vs memory-bandwidth floor: unmeasured (no CUDA device)")


if __name__ == "__main__":
    main()
