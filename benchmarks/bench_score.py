"""Benchmark `rnntool score` against merely reading the dump with h5py.

Makes (once, then reuses) two keyed float16 dumps:

- few-large: about ``--gb`` GB, V = 512, T 100-400, U 10-60 (the engine's work
  dominates);
- many-small: ``--small`` utterances (20,000 by default), V = 32, T 20-80,
  U 3-15 (per-utterance overheads dominate: HDF5 metadata, checks, launches);

and prints for each, from one run (medians of ``--repeats`` interleaved passes):

- h5py read: every utterance's logits and labels read whole (the I/O floor);
- rnntool scoring through the library (``score_rows``, as the CLI), raw data read with
  ``preadv`` (the default) and everything through HDF5 (``--via-hdf5``), as a
  fraction of the h5py read's throughput;
- peak resident memory of `rnntool score` in a subprocess, above the same
  command on a tiny dump, against the largest padded batch.

By default every pass reads from the page cache (after a warm-up pass), which
measures the engine and the data path, not the disk; ``--cold`` (root, Linux)
empties the page cache before each pass instead, as when a dump is scored once.

    python benchmarks/bench_score.py [--gb 1.0] [--small 20000] [--dir /tmp/rnntool-bench]
                                     [--batch-mb 64] [--cold]
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

from rnntool.dump import DumpWriter
from rnntool.reader import DumpReader, padded_bytes
from rnntool.score import score_rows


def make_dump(path: str, gb: float, V: int = 512, seed: int = 0, max_t: int = 400,
              max_u: int = 60, count: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    total = 0
    n = 0
    with DumpWriter(path, blank=0) as w:
        while (total < gb * 1e9) if count is None else (n < count):
            T = int(rng.integers(max_t // 4, max_t))
            U = int(rng.integers(max(1, max_u // 6), max_u))
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
            f["utts"][u]["labels"][()]
    return time.perf_counter() - t0, nbytes


def rnntool_score(path: str, batch_mb: int, direct: bool) -> float:
    t0 = time.perf_counter()
    with DumpReader(path, direct=direct) as r:  # as `rnntool score` does: rows streamed
        for _ in score_rows([(r, r.utt_ids)], budget_bytes=batch_mb << 20):
            pass
    return time.perf_counter() - t0


def peak_rss_of_score(path: str, batch_mb: int, direct: bool) -> int:
    """Max resident set (bytes) of a `rnntool score` subprocess."""
    extra = "" if direct else ", '--via-hdf5'"
    code = (
        "import sys; from rnntool.cli import main; sys.argv = ['rnntool', 'score', "
        f"{path!r}, '-q', '--batch-mb', '{batch_mb}', '-o', '/dev/null'{extra}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
        "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def compare(path: str, what: str, args, cold) -> None:
    h5py_read(path)  # warm the page cache
    for direct in (True, False):  # and the compiled kernels
        rnntool_score(path, args.batch_mb, direct)
    reads, direct_, via_hdf5 = [], [], []
    nbytes = 0
    for _ in range(args.repeats):  # interleaved, so all see the same machine
        cold()
        t, nbytes = h5py_read(path)
        reads.append(t)
        cold()
        direct_.append(rnntool_score(path, args.batch_mb, True))
        cold()
        via_hdf5.append(rnntool_score(path, args.batch_mb, False))
    t_read = statistics.median(reads)
    where = "from the disk (page cache emptied before each pass)" if args.cold else \
        "from the page cache"
    with DumpReader(path) as r:
        n = len(r)
    print(f"{what}: {n} utterances, {nbytes / 1e9:.2f} GB float16 logits {where}, median of "
          f"{args.repeats}:")
    print(f"  h5py read                  {t_read:7.3f} s  {nbytes / t_read / 1e9:6.2f} GB/s")
    for name, ts in (("rnntool score", direct_), ("rnntool score --via-hdf5", via_hdf5)):
        t = statistics.median(ts)
        print(f"  {name:25s} {t:7.3f} s  {nbytes / t / 1e9:6.2f} GB/s  "
              f"= {t_read / t:.0%} of the h5py read's throughput "
              f"({[round(x, 2) for x in ts]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--dir", default="/tmp/rnntool-bench")
    ap.add_argument("--batch-mb", type=int, default=64)
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
    small = os.path.join(args.dir, f"score-{args.small}-small.h5")
    tiny = os.path.join(args.dir, "score-tiny.h5")
    if not os.path.exists(big):
        make_dump(big, args.gb)
    if not os.path.exists(small):
        make_dump(small, 0, V=32, max_t=80, max_u=15, count=args.small)
    if not os.path.exists(tiny):
        make_dump(tiny, 0.0001, max_t=8, max_u=6)
    cold = drop_page_cache if args.cold else (lambda: None)
    compare(big, "few-large", args, cold)
    compare(small, "many-small", args, cold)

    with DumpReader(big) as r:
        largest = max(padded_bytes([i for i, _ in g])
                      for g in r.batches(r.utt_ids, args.batch_mb << 20))
    for direct, name in ((True, "rnntool score"), (False, "rnntool score --via-hdf5")):
        base = peak_rss_of_score(tiny, args.batch_mb, direct)
        extra = peak_rss_of_score(big, args.batch_mb, direct) - base
        print(f"  peak memory of `{name}` on few-large: {extra / 2**20:.0f} MiB above a tiny "
              f"dump's ({base / 2**20:.0f} MiB); largest batch {largest / 2**20:.0f} MiB = "
              f"{extra / largest:.2f}x")


if __name__ == "__main__":
    main()
