"""Benchmark `rnntool score` on a large float16 dump against merely reading it with h5py.

Makes (once, then reuses) a keyed dump of about ``--gb`` GB of float16 logits
with varied T and U, then prints, from one run:

- h5py read: every utterance's logits dataset read whole (the I/O floor);
- rnntool scoring through the library (``score_reader``), zero-copy from the
  file's pages (the default) and with ``--no-mmap`` (read into padded batches),
  and their throughput as a fraction of the h5py read's;
- peak resident memory of `rnntool score` in a subprocess, above the same
  command on a tiny dump, against the largest utterance (mapped) or the
  largest padded batch (``--no-mmap``).

By default every pass reads from the page cache (after a warm-up pass), which
measures the engine and the data path, not the disk; ``--cold`` (root, Linux)
empties the page cache before each pass instead, as when a dump is scored once.

    python benchmarks/bench_score.py [--gb 1.0] [--dir /tmp/rnntool-bench] [--batch-mb 256] [--cold]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import h5py
import numpy as np

from rnntool.dump import DumpReader, DumpWriter, padded_bytes
from rnntool.score import score_reader


def make_dump(path: str, gb: float, V: int = 512, seed: int = 0, max_t: int = 400,
              max_u: int = 60) -> None:
    rng = np.random.default_rng(seed)
    total = 0
    n = 0
    with DumpWriter(path, blank=0) as w:
        while total < gb * 1e9:
            T = int(rng.integers(max_t // 4, max_t))
            U = int(rng.integers(max_u // 6, max_u))
            x = rng.standard_normal((T, U + 1, V), dtype=np.float32).astype(np.float16)
            y = rng.integers(1, V, U)
            w.add(f"utt{n:05d}", x, y)
            total += x.nbytes
            n += 1
    print(f"made {path}: {n} utterances, {total / 1e9:.2f} GB of float16 logits")


def drop_page_cache() -> None:
    """Empty Linux's page cache (root only), so the next read comes from the disk."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")


def h5py_read(path: str) -> tuple[float, int]:
    nbytes = 0
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        for u in f["utts"]:
            nbytes += f["utts"][u]["logits"][()].nbytes
    return time.perf_counter() - t0, nbytes


def rnntool_score(path: str, batch_mb: int, zero_copy: bool) -> float:
    t0 = time.perf_counter()
    with DumpReader(path) as r:
        for _ in score_reader(r, r.utt_ids, budget_bytes=batch_mb << 20, zero_copy=zero_copy):
            pass
    return time.perf_counter() - t0


def peak_rss_of_score(path: str, batch_mb: int, zero_copy: bool) -> int:
    """Max resident set (bytes) of a `rnntool score` subprocess."""
    extra = "" if zero_copy else ", '--no-mmap'"
    code = (
        "import sys; from rnntool.cli import main; sys.argv = ['rnntool', 'score', "
        f"{path!r}, '-q', '--batch-mb', '{batch_mb}', '-o', '/dev/null'{extra}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
        "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--dir", default="/tmp/rnntool-bench")
    ap.add_argument("--batch-mb", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cold", action="store_true",
                    help="empty the page cache before every timed pass (Linux, root): "
                    "reads come from the disk, as for a dump scored once")
    args = ap.parse_args()
    if args.cold:
        try:
            drop_page_cache()
        except OSError as e:
            sys.exit(f"--cold needs root on Linux: {e}")
    os.makedirs(args.dir, exist_ok=True)
    big = os.path.join(args.dir, f"score-{args.gb:g}gb.h5")
    tiny = os.path.join(args.dir, "score-tiny.h5")
    if not os.path.exists(big):
        make_dump(big, args.gb)
    if not os.path.exists(tiny):
        make_dump(tiny, 0.0001, max_t=8, max_u=6)

    h5py_read(big)  # warm the page cache
    for zc in (True, False):  # and the compiled kernels
        rnntool_score(big, args.batch_mb, zc)
    reads, mapped, batched = [], [], []
    nbytes = 0
    cold = drop_page_cache if args.cold else (lambda: None)
    for _ in range(args.repeats):  # interleaved, so all see the same machine
        cold()
        t, nbytes = h5py_read(big)
        reads.append(t)
        cold()
        mapped.append(rnntool_score(big, args.batch_mb, True))
        cold()
        batched.append(rnntool_score(big, args.batch_mb, False))
    t_read = statistics.median(reads)
    where = "from the disk (page cache emptied before each pass)" if args.cold else \
        "from the page cache"
    print(f"{nbytes / 1e9:.2f} GB float16 logits {where}, median of {args.repeats}:")
    print(f"  h5py read                 {t_read:7.3f} s  {nbytes / t_read / 1e9:6.2f} GB/s")
    for name, ts in (("rnntool score", mapped), ("rnntool score --no-mmap", batched)):
        t = statistics.median(ts)
        print(f"  {name:24s} {t:7.3f} s  {nbytes / t / 1e9:6.2f} GB/s  "
              f"= {t_read / t:.0%} of the h5py read's throughput")

    with DumpReader(big) as r:
        largest = max(padded_bytes([i for i, _ in g])
                      for g in r.batches(r.utt_ids, args.batch_mb << 20))
        largest_utt = max(r.info(u).nbytes for u in r.utt_ids)
    for zc, name, ref, what in ((True, "rnntool score", largest_utt, "largest utterance"),
                                (False, "rnntool score --no-mmap", largest, "largest batch")):
        base = peak_rss_of_score(tiny, args.batch_mb, zc)
        extra = peak_rss_of_score(big, args.batch_mb, zc) - base
        print(f"  peak memory of `{name}`: {extra / 2**20:.0f} MiB above a tiny dump's "
              f"({base / 2**20:.0f} MiB); {what} {ref / 2**20:.0f} MiB = {extra / ref:.2f}x")


if __name__ == "__main__":
    main()
