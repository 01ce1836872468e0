"""Benchmark scaling `rnntool score` (or `align`) from 1 to 2 processes on one machine.

Makes (once, then reuses) a keyed float16 dump of about ``--gb`` GB, V = 512,
T 100-400, U 10-60: from the page cache the engine's passes over V, not the
read, are the limit (``bench_score.py``: the read is about a fifth of the
time), so the dump is CPU-bound. Then times, as whole commands from the shell
(start-up included, every output checked to be the same bytes), interleaved,
``--repeats`` times each, and prints the medians and their ratios:

- ``1 process, 1 thread``: ``NUMBA_NUM_THREADS=1 rnntool score``;
- ``1 process, N threads``: ``rnntool score`` (Numba's default, every core);
- ``2 shards + merge``: ``--shard 0/2`` and ``--shard 1/2`` at once, one thread
  each, then ``rnntool merge`` (an array job on one machine);
- ``torchrun, 2 ranks``: ``torchrun --standalone --nproc-per-node 2 -m rnntool
  score`` (gloo; each rank takes cores // 2 threads), its merge included.

Each run reads from the page cache (a warm-up pass first). The CPU seconds of
each case's processes (user + system, torchrun's ranks included) are printed
too: on a shared, loaded machine they say more than the wall time. Every case also runs
on a tiny dump (2 MB): its time is the case's fixed cost (start-up, torchrun's
rendezvous, the merge), and ``work`` = wall - fixed is what scales.

    python benchmarks/bench_scaling.py [--gb 4.0] [--dir /tmp/rnntool-bench] [--repeats 3]
                                       [--command score|align] [--dump PATH]
"""

from __future__ import annotations

import argparse
import filecmp
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from rnntool.dump import DumpWriter


def make_dump(path: str, gb: float, V: int = 512, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    total = n = 0
    with DumpWriter(path, blank=0) as w:
        while total < gb * 1e9:
            T = int(rng.integers(100, 400))
            U = int(rng.integers(10, 60))
            x = rng.standard_normal((T, U + 1, V), dtype=np.float32).astype(np.float16)
            w.add(f"utt{n:05d}", x, rng.integers(1, V, U))
            total += x.nbytes
            n += 1
    print(f"made {path}: {n} utterances, {total / 1e9:.2f} GB of float16 logits", flush=True)


CPU: list[float] = []  # CPU seconds (user + system) of each run's processes, in order


def run(cmds: list[list[str]], env: dict | None = None) -> float:
    """Wall time of ``cmds`` started together, until the last ends (each must succeed);
    their CPU time (with every descendant's: torchrun's ranks) goes to ``CPU``."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    procs = [subprocess.Popen(c, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    for c, p in zip(cmds, procs, strict=True):
        _, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"failed ({p.returncode}): {' '.join(c)}\n{err}")
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--dir", default="/tmp/rnntool-bench")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dump", help="score this dump instead (e.g. bench_score.py's many-small "
                    "dump: 20 000 utterances, where the per-utterance work in Python and "
                    "HDF5, one thread per process, is the limit)")
    ap.add_argument("--command", choices=("score", "align"), default="score",
                    help="align: about 20 times the CPU per byte of score (Viterbi, "
                    "posteriors, one utterance at a time)")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    dump = args.dump or os.path.join(args.dir, f"scaling-{args.gb:g}gb.h5")
    if not os.path.exists(dump):
        make_dump(dump, args.gb)
    tiny = os.path.join(args.dir, "scaling-tiny.h5")
    if not os.path.exists(tiny):
        make_dump(tiny, 0.002)
    out = lambda name: os.path.join(args.dir, name)  # noqa: E731
    rnntool = [sys.executable, "-m", "rnntool"]
    cores = len(os.sched_getaffinity(0))

    def cases(path: str, tag: str) -> dict:
        score = [*rnntool, args.command, path, "-q"]
        o = lambda name: out(f"{tag}-{name}")  # noqa: E731
        return {
            "1 process, 1 thread": lambda: run([[*score, "-o", o("one-1t.tsv")]],
                                               {"NUMBA_NUM_THREADS": "1"}),
            f"1 process, {cores} threads": lambda: run([[*score, "-o", o("one.tsv")]]),
            "2 shards + merge": lambda: run(
                [[*score, "--shard", f"{k}/2", "-o", o("sh.tsv")] for k in range(2)],
                {"NUMBA_NUM_THREADS": str(max(1, cores // 2))})
            + run([[*rnntool, "merge", o("sh.tsv.part-0-of-2"), o("sh.tsv.part-1-of-2"),
                    "-o", o("sh.tsv"), "-q"]]),
            "torchrun, 2 ranks": lambda: run([[
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", "2", "-m", "rnntool", args.command, path, "-q", "-o",
                o("tr.tsv")]]),
        }

    big, small = cases(dump, "big"), cases(tiny, "tiny")
    print(f"rnntool {args.command}, {os.path.getsize(dump) / 1e9:.2f} GB dump, {cores} cores; "
          "warm-up", flush=True)
    run([[*rnntool, args.command, dump, "-q", "-o", out("big-one.tsv")]])
    times = {k: [] for k in big}
    fixed = {k: [] for k in big}
    cpu = {k: [] for k in big}
    for r in range(args.repeats):
        for name in big:
            n = len(CPU)
            times[name].append(big[name]())
            cpu[name].append(sum(CPU[n:]))
            fixed[name].append(small[name]())
            print(f"  pass {r + 1}: {name}: {times[name][-1]:.2f} s, CPU {cpu[name][-1]:.2f} s "
                  f"(tiny dump: {fixed[name][-1]:.2f} s)", flush=True)
    for tag in ("big", "tiny"):
        for name in ("one-1t.tsv", "sh.tsv", "tr.tsv"):
            if not filecmp.cmp(out(f"{tag}-one.tsv"), out(f"{tag}-{name}"), shallow=False):
                sys.exit(f"{tag}-{name} differs from {tag}-one.tsv")
    print("every output is the same bytes as the single-process one")
    wall = {k: statistics.median(v) for k, v in times.items()}
    start = {k: statistics.median(v) for k, v in fixed.items()}
    work = {k: wall[k] - start[k] for k in wall}
    cpu_s = {k: statistics.median(v) for k, v in cpu.items()}
    one1, oneN = "1 process, 1 thread", f"1 process, {cores} threads"
    print(f"\nmedians of {args.repeats}; 'fixed' is the same run on a tiny dump (start-up, "
          "rendezvous, merge), 'work' = wall - fixed")
    print(f"| run | wall s | fixed s | work s | CPU s (all processes) | wall speed-up vs "
          f"{one1} | work speed-up vs {one1} | work speed-up vs {oneN} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for k in wall:
        print(f"| {k} | {wall[k]:.2f} | {start[k]:.2f} | {work[k]:.2f} | {cpu_s[k]:.2f} | "
              f"{wall[one1] / wall[k]:.2f}x | {work[one1] / work[k]:.2f}x | "
              f"{work[oneN] / work[k]:.2f}x |")
    print(f"\nload average after the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
