"""Benchmark rnntool's TDT loss against its own RNN-T loss on the same shapes.

Prints, per shape ``B,T,U,V`` and duration set, the forward+backward median time
of ``rnntool.tdt_loss`` on ``(B, T, U+1, V + D)`` logits and of
``rnntool.rnnt_loss`` on ``(B, T, U+1, V)`` logits (same B, T, U, V, same labels
and lengths), and their ratio. The TDT lattice has D arcs of each kind per node
instead of one, and a gradient over V + D instead of V, so the ratio says what
the durations cost.

    python benchmarks/bench_tdt.py                          # CPU, B 8, T 150, U 40, V 512, D 5
    python benchmarks/bench_tdt.py --device cuda --shapes 8,150,40,512 --durations 0,1,2,3,4

Not a test: numbers depend on the machine (and on what else runs on it); compare
the ratio within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

DEFAULT_SHAPES = ["8,150,40,512"]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, budget_s: float = 60.0) -> tuple[float, int]:
    """(median seconds of ``fn()``, repeats run) after one warm-up call (compilation)."""
    fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (time.perf_counter() - start < budget_s or not times):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def batch(B: int, T: int, U: int, V: int, D: int, device: str, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V + D, generator=g).to(device, dtype)
    labels = torch.randint(1, V, (B, U), generator=g).to(device)
    t_len = torch.full((B,), T, device=device)
    u_len = torch.full((B,), U, device=device)
    return logits, labels, t_len, u_len


def time_shape(B, T, U, V, durations, device, dtype, repeats):
    """``((rnnt_loss s, runs), (tdt_loss s, runs))``, forward+backward, on one batch."""
    import rnntool

    logits, labels, t_len, u_len = batch(B, T, U, V, len(durations), device, dtype)
    x_tdt = logits.clone().requires_grad_(True)
    x_rnnt = logits[..., :V].contiguous().requires_grad_(True)

    def run_rnnt():
        x_rnnt.grad = None
        rnntool.rnnt_loss(x_rnnt, labels, t_len, u_len, blank=0, reduction="sum").backward()

    def run_tdt():
        x_tdt.grad = None
        rnntool.tdt_loss(x_tdt, labels, t_len, u_len, durations=durations, blank=0,
                         reduction="sum").backward()

    return median_time(run_rnnt, device, repeats), median_time(run_tdt, device, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "float16", "bfloat16", "float64"])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="B,T,U,V ...")
    ap.add_argument("--durations", default="0,1,2,3,4", help="the duration set, e.g. 0,1,2,3,4")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()

    import numba

    import rnntool

    durations = [int(d) for d in args.durations.split(",")]
    D = len(durations)
    dtype = getattr(torch, args.dtype)
    print(f"# rnntool {rnntool.__version__}, torch {torch.__version__}, numba "
          f"{numba.__version__}, device {args.device}, dtype {args.dtype}, "
          f"{os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}")
    print(f"# forward+backward, median of up to {args.repeats} runs after a warm-up; "
          f"durations {durations}")
    print(f"{'shape B,T,U,V':>18} {'D':>2} {'rnnt_loss s':>12} {'tdt_loss s':>11} "
          f"{'tdt/rnnt':>9}")
    for shape in args.shapes:
        B, T, U, V = (int(v) for v in shape.split(","))
        (t_rnnt, n_rnnt), (t_tdt, n_tdt) = time_shape(B, T, U, V, durations, args.device,
                                                      dtype, args.repeats)
        print(f"{shape:>18} {D:>2} {t_rnnt:12.4f} {t_tdt:11.4f} {t_tdt / t_rnnt:9.2f}"
              f"   (runs: {n_rnnt}, {n_tdt})")

if __name__ == "__main__":
    main()
