"""Benchmark rnntool's loss against the tools users would otherwise pick.

Prints, per shape: forward-only and forward+backward median times, the
forward's peak extra memory (no gradient), and ratios to rnntool, for

- rnntool (this checkout), on the chosen device;
- torchaudio.functional.rnnt_loss and warprnnt_numba, when they import;
- one torch.log_softmax pass over the same tensor: the memory-traffic floor
  (read the logits once, write a tensor of the same size).

On CUDA it also prints peak GPU memory and achieved bandwidth: bytes of
logits read plus gradient written, divided by the forward+backward time.

    python benchmarks/bench_loss.py                       # CPU, the three default shapes
    python benchmarks/bench_loss.py --device cuda --dtype float16 --shapes 32,400,100,1024

Not a test: numbers depend on the machine; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time

import torch

DEFAULT_SHAPES = ["8,150,40,512", "32,150,40,28", "4,150,20,5000"]


# --------------------------------------------------------------------------- candidates
def make_candidates(device: str):
    """name -> (loss_fn(logits, labels, T, U) -> scalar loss) for every tool that imports."""
    import rnntool

    cands = {"rnntool": lambda x, y, T, U: rnntool.rnnt_loss(x, y, T, U, blank=0,
                                                              reduction="sum")}
    missing = {}
    try:
        import torchaudio.functional as taf

        def ta(x, y, T, U):
            return taf.rnnt_loss(x, y.int(), T.int(), U.int(), blank=0, reduction="sum")

        cands["torchaudio"] = ta
    except Exception as e:  # noqa: BLE001 (any import failure means "absent")
        missing["torchaudio"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    try:
        from warprnnt_numba import RNNTLossNumba

        warp = RNNTLossNumba(blank=0, reduction="sum")

        def wn(x, y, T, U):
            return warp(x, y.int(), T.int(), U.int())

        cands["warprnnt_numba"] = wn
    except Exception as e:  # noqa: BLE001
        missing["warprnnt_numba"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return cands, missing


# --------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int, budget_s: float = 20.0) -> float:
    fn()  # warm-up: compilation, caches
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (time.perf_counter() - start < budget_s or len(times) < 1):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_extra_bytes(fn, device: str) -> int | None:
    """Peak memory fn() allocates above what is live before it (CPU: resident set)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:  # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM).
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0) * 1024


def cpu_peak_in_child(name: str, shape, dtype) -> int | None:
    """CPU forward peak extra memory of one candidate, measured in a fresh process.

    The child runs with every allocation over 64 KiB mmapped and unmapped on free,
    so its resident set counts the call's own allocations, not reused heap pages.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--mem-child", name, "--dtype", str(dtype).split(".")[1],
           "--shapes", ",".join(map(str, shape))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def mem_child(name: str, shape, dtype) -> None:
    cands, _ = make_candidates("cpu")
    cands["log_softmax"] = lambda x, y, T, U: torch.log_softmax(x, -1)
    fn = cands[name]
    small = make_inputs((1, 2, 1, shape[3]), "cpu", dtype)
    with torch.no_grad():
        fn(*small)  # load compiled code before measuring
    inputs = make_inputs(shape, "cpu", dtype)

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    peak = peak_extra_bytes(fwd, "cpu")
    print(-1 if peak is None else peak)


# --------------------------------------------------------------------------- one shape
def make_inputs(shape, device, dtype):
    B, T, U, V = shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, U + 1, V, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(1, V, (B, max(U, 1)), generator=g).to(device)
    t_len = torch.full((B,), T, dtype=torch.int64, device=device)
    u_len = torch.full((B,), U, dtype=torch.int64, device=device)
    return logits, labels, t_len, u_len


def bench_shape(shape, device, dtype, cands, repeats):
    logits, labels, t_len, u_len = make_inputs(shape, device, dtype)
    nbytes = logits.numel() * logits.element_size()
    rows = {}
    for name, loss_fn in cands.items():
        x = logits.detach().clone().requires_grad_(True)

        def fwd(loss_fn=loss_fn):
            with torch.no_grad():
                loss_fn(logits, labels, t_len, u_len)

        def fwd_bwd(loss_fn=loss_fn, x=x):
            x.grad = None
            loss_fn(x, labels, t_len, u_len).backward()

        try:
            row = {
                "fwd": median_time(fwd, device, repeats),
                "fwd_bwd": median_time(fwd_bwd, device, repeats),
            }
            x.grad = None
            row["fwd_mem"] = (
                peak_extra_bytes(fwd, device) if device == "cuda"
                else cpu_peak_in_child(name, shape, dtype)
            )
            if device == "cuda":
                row["fwd_bwd_mem"] = peak_extra_bytes(fwd_bwd, device)
        except Exception as e:  # noqa: BLE001 (a competitor failing is a result, not a crash)
            row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}
        rows[name] = row
        del x
        gc.collect()

    def lsm():
        with torch.no_grad():
            torch.log_softmax(logits, -1)

    rows["log_softmax (floor)"] = {
        "fwd": median_time(lsm, device, repeats),
        "fwd_mem": (
            peak_extra_bytes(lsm, device) if device == "cuda"
            else cpu_peak_in_child("log_softmax", shape, dtype)
        ),
    }
    return nbytes, rows


def fmt_time(s: float | None) -> str:
    return "-" if s is None else (f"{s * 1e3:9.2f} ms" if s < 10 else f"{s:9.2f} s ")


def fmt_mem(b: int | None, nbytes: int) -> str:
    return "-" if b is None else f"{b / 2**20:8.1f} MiB ({100 * b / nbytes:5.1f}%)"


def report(shape, dtype, nbytes, rows, device):
    B, T, U, V = shape
    print(f"\n== B={B} T={T} U={U} V={V} {str(dtype).removeprefix('torch.')} on {device}: "
          f"logits {nbytes / 2**20:.1f} MiB")
    ours = rows["rnntool"]
    floor = rows["log_softmax (floor)"]["fwd"]
    head = f"{'':22s} {'forward':>12s} {'fwd+bwd':>12s} {'fwd+bwd vs rnntool':>19s} " \
           f"{'forward peak extra mem':>24s}"
    if device == "cuda":
        head += f" {'fwd+bwd peak mem':>18s} {'bandwidth':>11s}"
    print(head)
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:22s} failed: {row['error']}")
            continue
        fb = row.get("fwd_bwd")
        ratio = "-" if fb is None or "fwd_bwd" not in ours else f"{fb / ours['fwd_bwd']:.2f}x"
        line = (f"{name:22s} {fmt_time(row['fwd']):>12s} {fmt_time(fb):>12s} {ratio:>19s} "
                f"{fmt_mem(row.get('fwd_mem'), nbytes):>24s}")
        if device == "cuda" and fb is not None:
            bw = 2 * nbytes / fb / 1e9  # logits read + gradient written
            line += f" {fmt_mem(row.get('fwd_bwd_mem'), nbytes):>18s} {bw:8.0f} GB/s"
        print(line)
    if "fwd_bwd" in ours:
        print(f"rnntool fwd+bwd = {ours['fwd_bwd'] / floor:.2f}x one log_softmax pass; "
              f"forward = {ours['fwd'] / floor:.2f}x")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, metavar="B,T,U,V")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--only", nargs="+", help="run only these candidates (rnntool always runs)")
    ap.add_argument("--mem-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.mem_child:
        mem_child(args.mem_child, tuple(int(v) for v in args.shapes[0].split(",")), dtype)
        return
    cands, missing = make_candidates(args.device)
    if args.only:
        cands = {k: v for k, v in cands.items() if k == "rnntool" or k in args.only}
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} torch threads, "
          f"NUMBA_NUM_THREADS={os.environ.get('NUMBA_NUM_THREADS', 'default')}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    for name, why in missing.items():
        print(f"{name}: absent ({why})")
    for s in args.shapes:
        shape = tuple(int(v) for v in s.split(","))
        nbytes, rows = bench_shape(shape, args.device, dtype, cands, args.repeats)
        report(shape, dtype, nbytes, rows, args.device)


if __name__ == "__main__":
    main()
