"""Benchmark lattice-only dumps against full-logit dumps.

Part 1, the issue's batch: B = 16 utterances of T = 200, U = 60, V = 1024 float16
logits (one padded batch, every utterance full length), written through
``DumpWriter`` as a full dump and as a lattice dump (the lattice writer runs the
engine's normalise stage on the logits, on the CPU here), then scored with
``score_reader``. Prints the two file sizes and their ratio, and medians of
``--repeats`` interleaved passes of each write and each score.

Part 2, an eval set: ``--utts`` utterances (T 100-400, U 10-80) written as a
lattice dump (through the lattice writer, from small-V logits: the lattice does
not depend on V), then scored, against h5py reading the datasets scoring
needs (``blank_lp``, ``emit_lp``, ``labels``) of every utterance: the I/O floor.
Both from the page cache after a warm-up pass.

    python benchmarks/bench_lattice.py [--repeats 5] [--utts 2000] [--dir /tmp/rnntool-bench]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import h5py
import numpy as np

from rnntool.dump import DumpWriter
from rnntool.reader import DumpReader
from rnntool.score import score_reader


def batch(B: int, T: int, U: int, V: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((B, T, U + 1, V), dtype=np.float32) * 3).astype(np.float16)
    y = rng.integers(1, V, (B, U))
    return x, y, np.full(B, T), np.full(B, U)


def write(path: str, kind: str, x, y, t_len, u_len) -> float:
    t0 = time.perf_counter()
    with DumpWriter(path, blank=0, kind=kind) as w:
        w.add_batch(x, y, t_len, u_len, [f"utt{b:03d}" for b in range(x.shape[0])])
    return time.perf_counter() - t0


def score(path: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    with DumpReader(path) as r:
        total = sum(row["loss"] for row in score_reader(r, r.utt_ids))
    return time.perf_counter() - t0, total


def h5py_read_lattice(path: str) -> float:
    t0 = time.perf_counter()
    with h5py.File(path, "r") as f:
        utts = f["utts"]
        for u in utts:
            g = utts[u]
            g["blank_lp"][()]
            g["emit_lp"][()]
            g["labels"][()]
    return time.perf_counter() - t0


def make_eval_set(path: str, n: int, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    V = 32
    t0 = time.perf_counter()
    with DumpWriter(path, blank=0, kind="lattice") as w:
        for k in range(n):
            T = int(rng.integers(100, 400))
            U = int(rng.integers(10, 80))
            x = (rng.standard_normal((T, U + 1, V), dtype=np.float32) * 3).astype(np.float16)
            w.add(f"utt{k:06d}", x, rng.integers(1, V, U))
    print(f"made {path}: {n} utterances in {time.perf_counter() - t0:.1f} s, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--utts", type=int, default=2000)
    ap.add_argument("--dir", default="/tmp/rnntool-bench")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)

    # ---- part 1: the batch
    B, T, U, V = 16, 200, 60, 1024
    x, y, t_len, u_len = batch(B, T, U, V)
    full, lat = os.path.join(a.dir, "batch-full.h5"), os.path.join(a.dir, "batch-lattice.h5")
    times = {k: [] for k in ("write full", "write lattice", "score full", "score lattice")}
    losses = {}
    for rep in range(a.repeats + 1):  # the first pass warms up (compilation, page cache)
        w_full = write(full, "full", x, y, t_len, u_len)
        w_lat = write(lat, "lattice", x, y, t_len, u_len)
        s_full, losses["full"] = score(full)
        s_lat, losses["lattice"] = score(lat)
        if rep:
            for k, v in zip(times, (w_full, w_lat, s_full, s_lat), strict=True):
                times[k].append(v)
    size_full, size_lat = os.path.getsize(full), os.path.getsize(lat)
    print(f"B={B} T={T} U={U} V={V} float16 logits ({x.nbytes / 2**20:.0f} MiB), "
          f"medians of {a.repeats} passes:")
    print(f"  full dump     {size_full / 2**20:9.2f} MiB")
    print(f"  lattice dump  {size_lat / 2**20:9.2f} MiB")
    print(f"  size ratio    {size_full / size_lat:9.0f}x smaller")
    for k, v in times.items():
        print(f"  {k:14s}{statistics.median(v) * 1e3:9.1f} ms")
    speedup = statistics.median(times["score full"]) / statistics.median(times["score lattice"])
    print(f"  score full / score lattice: {speedup:.0f}x;  summed losses equal to the bit: "
          f"{losses['full'] == losses['lattice']}")

    # ---- part 2: an eval set
    if a.utts <= 0:
        return
    path = os.path.join(a.dir, f"eval-lattice-{a.utts}.h5")
    if not os.path.exists(path):
        make_eval_set(path, a.utts)
    score(path)  # warm-up
    h5, ours = [], []
    for _ in range(a.repeats):
        h5.append(h5py_read_lattice(path))
        ours.append(score(path)[0])
    m_h5, m_ours = statistics.median(h5), statistics.median(ours)
    print(f"eval set: {a.utts} utterances, {os.path.getsize(path) / 2**20:.1f} MiB lattice dump")
    print(f"  h5py read (blank_lp, emit_lp, labels)  {m_h5:7.2f} s  "
          f"({a.utts / m_h5:7.0f} utt/s)")
    print(f"  rnntool score (library)                {m_ours:7.2f} s  "
          f"({a.utts / m_ours:7.0f} utt/s)  = {m_h5 / m_ours:.0%} of h5py's throughput")


if __name__ == "__main__":
    main()
