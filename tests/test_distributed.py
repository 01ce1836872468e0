"""Scale-out: torchrun ranks, --shard K/N parts, merge and --resume give the single-process
output byte for byte; bad input, a killed rank and a foreign part stop with one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, invoke, one_line_error, random_batch, run_cli, write_keyed_raw

from rnntool.distributed import (
    Share,
    ShareError,
    parse_share,
    part_path,
    plan_work,
    read_part,
    share_of,
    torchrun_env,
)
from rnntool.dump import DumpWriter

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node", "2", "-m", "rnntool"]


def torchrun(*args, env=None, timeout=180):
    """``torchrun --standalone --nproc-per-node 2 -m rnntool ARGS`` on the CPU (gloo)."""
    return subprocess.run([*TORCHRUN, *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def shards(tmp_path):
    """Three small keyed dumps (7, 9, 5 utterances, mixed lengths, U = 0 among them,
    stored losses in one); one utterance's logits hold a NaN (an impossible loss: exit 1,
    its score row still written, no align rows)."""
    paths = []
    for k, B in enumerate((7, 9, 5)):
        x, y, T, U = random_batch(B, 8, 4, 6, seed=40 + k)
        if k == 1:
            x[3, 0, 0, 2] = float("nan")
        path = tmp_path / f"shard{k}.h5"
        with DumpWriter(path, blank=0, vocab=list("_abcde")) as w:
            w.add_batch(x, y, T, U, utt_ids=[f"s{k}-utt{b:02d}" for b in range(B)],
                        losses=torch.arange(float(B)) if k == 0 else None)
        paths.append(path)
    return paths


def single(command, shards, out, *opts):
    """The single-process run: its output bytes, and the finished process."""
    r = run_cli(command, *shards, "-o", out, *opts)
    assert r.returncode == 1, r.stderr  # the NaN utterance
    return out.read_bytes(), r


def summary_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if " utterances, mean loss " in line or line.startswith("worst: ")]


# --------------------------------------------------------------------------- assignment
def test_every_utterance_is_in_exactly_one_share_and_the_hash_is_stable(shards):
    from rnntool.reader import DumpReader

    readers = [DumpReader(p) for p in shards]
    try:
        selected = [(r, r.utt_ids) for r in readers]
        for n in (1, 2, 3, 7):
            got = [(i, j) for k in range(n) for i, _, _, js in plan_work(selected, Share(k, n))
                   for j in js]
            assert sorted(got) == [(i, j) for i, (_, ids) in enumerate(selected)
                                   for j in range(len(ids))]
    finally:
        for r in readers:
            r.close()
    # Fixed values: the assignment must not change between Python runs or versions;
    # the expectation is the documented convention computed here with hashlib
    # (blake2b of path NUL utt_id, 8 bytes little-endian, mod N), not share_of itself.
    # N = 7: 256 = 1 mod 3, 5 and 17, so those counts cannot tell the byte order.
    expected = [int.from_bytes(hashlib.blake2b(f"a/b.h5\0u{i}".encode(), digest_size=8)
                               .digest(), "little") % 7 for i in range(12)]
    assert len(set(expected)) > 1
    code = ("from rnntool.distributed import share_of; "
            "print([share_of('a/b.h5', f'u{i}', 7) for i in range(12)])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout
            for seed in ("1", "2")}
    assert outs == {str(expected) + "\n"}
    assert [share_of("a/b.h5", f"u{i}", 7) for i in range(12)] == expected
    assert share_of("x.h5", "u", 1) == 0


def test_torchrun_is_known_by_its_environment():
    assert torchrun_env({}) is None
    assert torchrun_env({"RANK": "1", "WORLD_SIZE": "2"}) is None  # no LOCAL_RANK
    tr = torchrun_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                       "LOCAL_WORLD_SIZE": "2"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.local_world_size) == (3, 4, 1, 2)
    assert tr.share == Share(3, 4)
    for env in ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
                {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}):
        with pytest.raises(ShareError):
            torchrun_env(env)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "0/0", "1", "a/b", "1/2/3", ""])
def test_a_bad_shard_spec_is_refused(text):
    with pytest.raises(ValueError, match="K/N"):
        parse_share(text)


# --------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize(("command", "fmt"), [("score", "tsv"), ("align", "jsonl")])
def test_torchrun_on_two_cpu_ranks_writes_the_single_process_output(shards, tmp_path,
                                                                    command, fmt):
    want, one = single(command, shards, tmp_path / f"one.{fmt}", "-f", fmt)
    out = tmp_path / f"tr.{fmt}"
    r = torchrun(command, *shards, "-o", out, "-f", fmt)
    assert r.returncode != 0  # the NaN utterance: exit 1 from the ranks, so torchrun fails
    assert "rnntool: error" not in r.stderr, r.stderr  # exit 1 (a finding), not 2
    assert out.read_bytes() == want
    assert summary_lines(r.stderr) == summary_lines(one.stderr)
    assert not list(tmp_path.glob("tr.*.part-*")) and not list(tmp_path.glob(".rnntool-*"))
    # The problem utterance is named once (by the rank that scored it), as in one process.
    assert r.stderr.count("utterance s1-utt03: loss is nan") == 1
    # Each of the 2 ranks on the CPU takes half the cores for Numba's threads.
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"rank 0 on cpu ({threads} thread{'s' if threads > 1 else ''})" in r.stderr


def test_torchrun_all_well_exits_0(shards, tmp_path):
    clean = shards[0], shards[2]
    want = run_cli("score", *clean, "-q", "-f", "csv").stdout
    r = torchrun("score", *clean, "-o", tmp_path / "s.csv", "-f", "csv", "-q")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s.csv").read_text() == want


def test_a_bad_utterance_on_one_rank_stops_every_rank_with_no_output(shards, tmp_path):
    rng = np.random.default_rng(3)
    bad_id = next(f"bad{i}" for i in range(100)
                  if share_of(str(tmp_path / "bad.h5"), f"bad{i}", 2) == 1)
    utts = {f"ok{i}": (rng.standard_normal((4, 3, 6)).astype(np.float32), np.array([1, 2]))
            for i in range(4)}
    utts[bad_id] = (rng.standard_normal((4, 3, 6)).astype(np.float32), np.array([1, 41]))
    write_keyed_raw(tmp_path / "bad.h5", utts, format="rnntool.dump", format_version=1,
                    blank=0, vocab_size=6)
    out = tmp_path / "s.tsv"
    # Rank 0 is slow (1 s an utterance): it stops early when rank 1 fails, instead of
    # finishing its share first.
    r = torchrun("score", shards[0], shards[1], tmp_path / "bad.h5", "-o", out, timeout=120,
                 env={"RNNTOOL_TEST_RECORD_DELAY": "1", "RNNTOOL_TEST_KILL_RANK": "0"})
    assert r.returncode != 0
    assert f"rnntool: error: {tmp_path / 'bad.h5'}: utterance {bad_id}: labels[1] = 41 is " \
           "outside [0, 6)" in r.stderr
    assert "rank 1 of 2 failed" in r.stderr  # rank 0 heard of it at the barrier
    assert "Traceback" not in r.stderr.split("torch/distributed/elastic")[0]
    assert not out.exists() and not list(tmp_path.glob(".rnntool-*"))
    part0 = read_part(part_path(str(out), Share(0, 2)))
    assert not part0.complete
    assert len(part0.keys()) < min(4, part0.header["share_utterances"])


def test_a_rank_killed_mid_way_stops_the_job_and_resume_finishes_it(shards, tmp_path):
    want, _ = single("score", shards, tmp_path / "one.tsv")
    out = tmp_path / "s.tsv"
    rank1 = sum(share_of(str(p), u, 2) == 1 for p in shards
                for u in _ids(p))
    assert rank1 >= 3
    r = torchrun("score", *shards, "-o", out,
                 env={"RNNTOOL_TEST_KILL_AFTER": "2", "RNNTOOL_TEST_KILL_RANK": "1"},
                 timeout=120)  # rank 0 must not wait for rank 1 forever: torchrun stops it
    assert r.returncode != 0 and not out.exists()
    part1 = read_part(part_path(str(out), Share(1, 2)))
    assert not part1.complete and len(part1.keys()) == 2
    r = torchrun("score", *shards, "-o", out, "--resume")
    assert r.returncode != 0 and "rnntool: error" not in r.stderr, r.stderr  # exit 1: NaN
    assert out.read_bytes() == want


def _ids(path):
    from rnntool.reader import DumpReader

    with DumpReader(path) as r:
        return list(r.utt_ids)


# --------------------------------------------------------------------------- --shard + merge
@pytest.mark.parametrize(("command", "fmt"), [("score", "tsv"), ("score", "csv"),
                                              ("score", "jsonl"), ("score", "json"),
                                              ("score", "table"), ("align", "tsv"),
                                              ("align", "json"), ("score+lattice", "tsv")])
def test_shards_merged_are_the_single_process_output(shards, tmp_path, command, fmt):
    if command == "score+lattice":  # a lattice dump among the inputs
        command = "score"
        lattice = tmp_path / "lattice.h5"
        assert invoke("compact", shards[0], "-o", lattice, "-q").exit_code == 0
        shards = [*shards, lattice]
    want = invoke(command, *shards, "-f", fmt)
    assert want.exit_code == 1, want.stderr
    out = tmp_path / "s.out"
    for k in range(3):
        r = invoke(command, *shards, "--shard", f"{k}/3", "-o", out, "-f", fmt, "-q")
        assert r.exit_code in (0, 1), r.stderr
        assert not r.stdout
    assert not out.exists()
    parts = [part_path(str(out), Share(k, 3)) for k in (2, 0, 1)]  # any order
    r = invoke("merge", *parts, "-o", out)
    assert r.exit_code == 1, r.stderr
    assert out.read_text() == want.stdout
    assert summary_lines(r.stderr) == summary_lines(want.stderr)
    assert "utterance s1-utt03: loss is nan" in r.stderr  # merge names it again
    r = invoke("merge", *parts)  # to stdout, in the parts' format
    assert r.stdout == want.stdout
    if fmt == "tsv":  # another format on request
        other = invoke(command, *shards, "-f", "jsonl").stdout
        assert other and invoke("merge", *parts, "-f", "jsonl").stdout == other


def test_a_killed_share_resumes_to_the_same_output(shards, tmp_path):
    want, _ = single("score", shards, tmp_path / "one.tsv")
    out = tmp_path / "s.tsv"
    r = run_cli("score", *shards, "--shard", "1/2", "-o", out,
                env={**os.environ, "RNNTOOL_TEST_KILL_AFTER": "3"})
    assert r.returncode == -9  # SIGKILL after its third utterance's line
    part = part_path(str(out), Share(1, 2))
    with open(part, "a") as f:  # and a line cut short by the kill
        f.write('{"k":[2,')
    assert run_cli("score", *shards, "--shard", "0/2", "-o", out, "-q").returncode in (0, 1)
    one_line_error(invoke("merge", part_path(str(out), Share(0, 2)), part),
                   "share 1/2 is incomplete", "--resume")
    r = run_cli("score", *shards, "--shard", "1/2", "-o", out, "--resume")
    assert r.returncode in (0, 1), r.stderr
    assert "(3 already done)" in r.stderr
    lines = Path(part).read_text().splitlines()
    assert [json.loads(x)["k"] for x in lines[1:-1]] == sorted(
        json.loads(x)["k"] for x in lines[1:-1])
    # Resuming a complete part does nothing more.
    r = run_cli("score", *shards, "--shard", "1/2", "-o", out, "--resume", "-q")
    assert r.returncode in (0, 1) and Path(part).read_text().splitlines() == lines
    r = invoke("merge", part_path(str(out), Share(0, 2)), part, "-o", out, "-q")
    assert r.exit_code == 1 and out.read_bytes() == want


@pytest.mark.parametrize(("change", "needle"), [
    (["--blank", "2"], "--blank (not given), not 2"),
    (["--skip-bad"], "--skip-bad false, not true"),
    (["-f", "jsonl"], "--format tsv, not jsonl"),
    (["--utt", "s0-utt01"], "another selection of utterances"),
    (["DROP"], "from the inputs"),
    (["TOUCH"], "modification time has changed"),
    (["SHARE"], "for share 0/2, not 1/2"),
])
def test_resume_with_other_inputs_or_options_exits_2(shards, tmp_path, change, needle):
    out = tmp_path / "s.tsv"
    base = [*shards, "-o", out]
    assert invoke("score", *base, "--shard", "0/2", "-q").exit_code in (0, 1)
    part = part_path(str(out), Share(0, 2))
    before = Path(part).read_text()
    shard = "0/2"
    if change == ["DROP"]:
        base, change = [*shards[:2], "-o", out], []
    elif change == ["TOUCH"]:
        st = os.stat(shards[1])
        os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        change = []
    elif change == ["SHARE"]:  # another share's part, renamed into this one's place
        os.replace(part, part_path(str(out), Share(1, 2)))
        shard, part, change = "1/2", part_path(str(out), Share(1, 2)), []
    r = invoke("score", *base, "--shard", shard, "--resume", *change)
    one_line_error(r, part, needle, "without --resume")
    assert Path(part).read_text() == before  # untouched


def test_merge_refuses_missing_repeated_foreign_and_non_parts(shards, tmp_path):
    out = tmp_path / "s.tsv"
    for k in range(2):
        assert invoke("score", *shards, "--shard", f"{k}/2", "-o", out, "-q").exit_code in (0, 1)
    p0, p1 = (part_path(str(out), Share(k, 2)) for k in range(2))
    other = tmp_path / "o.tsv"
    assert invoke("score", *shards[:2], "--shard", "1/2", "-o", other, "-q").exit_code in (0, 1)
    merged = tmp_path / "m.tsv"
    one_line_error(invoke("merge", p0, "-o", merged), "share 1/2 is missing")
    one_line_error(invoke("merge", p0, p0, "-o", merged), "are both share 0/2")
    one_line_error(invoke("merge", p0, part_path(str(other), Share(1, 2)), "-o", merged),
                   "is not a part of the same run", "from the inputs")
    one_line_error(invoke("merge", p0, shards[0], "-o", merged), "not an rnntool part file")
    one_line_error(invoke("merge", p0, p1, "-o", p0), "is also an input")
    one_line_error(invoke("merge", p0, p1, "-o", shards[0]), "is also an input")
    with open(p1, "a") as f:  # a record after the end line: not ours
        f.write('{"k":[0,0],"rows":[],"info":{}}\n')
    one_line_error(invoke("merge", p0, p1, "-o", merged), "incomplete")
    assert not merged.exists() and not list(tmp_path.glob(".rnntool-*"))


@pytest.mark.parametrize(("args", "needle"), [
    (["--shard", "0/2"], "needs -o FILE"),
    (["--shard", "0/2", "-o", "-"], "needs -o FILE"),
    (["--shard", "0/2", "-o", "/dev/null"], "regular file name"),
    (["--shard", "3/2", "-o", "x.tsv"], "0 <= K < N"),
    (["--resume", "-o", "x.tsv"], "--resume continues a part file"),
])
def test_shard_usage_errors_are_one_line(shards, args, needle):
    one_line_error(invoke("score", shards[0], *args), needle)


def test_the_summary_is_made_of_sums_over_all_rows():
    from rnntool.score import summarize

    rows = [{"utt_id": "a", "loss": 6.0, "T": 10, "U": 3},
            {"utt_id": "b", "loss": 1.0, "T": 2, "U": 0},
            {"utt_id": "c", "loss": float("nan"), "T": 5, "U": 5}]
    s = summarize(rows)
    assert (s["count"], s["finite"], s["total"], s["frames"], s["tokens"]) == (3, 2, 7.0, 12, 4)
    assert s["per_frame"] == 7.0 / 12 and s["per_token"] == 7.0 / 4  # not a mean of means


def test_merge_help_names_metavars_a_shell_user_reads():
    text = invoke("merge", "--help").stdout
    assert "PART..." in text and "FILE" in text
    for python_type in ("<list[", "<str>", "<Path>", "{parts}"):
        assert python_type not in text
    for command in ("score", "align"):
        text = invoke(command, "--help").stdout
        assert "--shard K/N" in text and "--resume" in text and "torchrun" in text


def test_each_share_decides_its_own_columns_and_the_merge_takes_them_all(shards, tmp_path):
    # Only shard0's utterances carry a stored loss: shares without one (or empty) say so
    # without looking at any other share's utterances; the merge has the columns.
    inputs = [shards[2], shards[0]]
    want = invoke("score", *inputs, "-f", "tsv")
    assert want.exit_code == 0 and "stored_loss" in want.stdout.splitlines()[0]
    out = tmp_path / "s.tsv"
    n = 8
    for k in range(n):
        assert invoke("score", *inputs, "--shard", f"{k}/{n}", "-o", out, "-q").exit_code == 0
    parts = [read_part(part_path(str(out), Share(k, n))) for k in range(n)]
    assert any("stored_loss" not in p.header["fields"] for p in parts)
    assert any("stored_loss" in p.header["fields"] for p in parts)
    r = invoke("merge", *(p.path for p in parts), "-o", out, "-q")
    assert r.exit_code == 0 and out.read_text() == want.stdout


def test_skip_bad_shards_merge_to_the_single_run(shards, tmp_path):
    rng = np.random.default_rng(4)
    utts = {f"ok{i}": (rng.standard_normal((4, 3, 6)).astype(np.float32), np.array([1, 2]))
            for i in range(6)}
    for i in range(3):
        utts[f"bad{i}"] = (rng.standard_normal((4, 3, 6)).astype(np.float32),
                           np.array([1, 41]))
    write_keyed_raw(tmp_path / "bad.h5", utts, format="rnntool.dump", format_version=1,
                    blank=0, vocab_size=6)
    inputs = [shards[0], tmp_path / "bad.h5"]
    want = invoke("score", *inputs, "--skip-bad")
    assert want.exit_code == 1 and "3 bad, skipped" in want.stderr
    out = tmp_path / "s.tsv"
    for k in range(2):
        r = invoke("score", *inputs, "--skip-bad", "--shard", f"{k}/2", "-o", out, "-q")
        assert r.exit_code in (0, 1), r.stderr
    r = invoke("merge", *(part_path(str(out), Share(k, 2)) for k in range(2)), "-o", out)
    assert r.exit_code == 1 and out.read_text() == want.stdout
    assert summary_lines(r.stderr) == summary_lines(want.stderr)
    assert sorted(x for x in r.stderr.splitlines() if "labels[1] = 41" in x) == sorted(
        x for x in want.stderr.splitlines() if "labels[1] = 41" in x)


# --------------------------------------------------------------------------- timestamps
TS_VOCAB = ["<b>", "\u2581the", "\u2581c", "at", "\u2581sat", "s"]


@pytest.fixture
def timed(tmp_path):
    """Three dumps (6, 8, 5 utterances, random logits, frame shift 40 ms, U = 0 among
    them) whose ids sort across the inputs (the CTM's order is not the inputs'), one
    utterance with a NaN logit (no times: exit 1), and a reference CTM of every
    utterance's words at random times (random emission delays)."""
    from rnntool.timestamps import word_groups

    rng = np.random.default_rng(11)
    paths, ref = [], []
    for k, B in enumerate((6, 8, 5)):
        x, y, T, U = random_batch(B, 12, 5, len(TS_VOCAB), seed=70 + k)
        if k == 1:
            x[2, 0, 0, 1] = float("nan")
        ids = [f"u{(7 * b + 5 * k) % 23:02d}-{k}" for b in range(B)]
        path = tmp_path / f"timed{k}.h5"
        with DumpWriter(path, blank=0, vocab=TS_VOCAB, frame_shift=0.04) as w:
            w.add_batch(x, y, T, U, utt_ids=ids)
        paths.append(path)
        for b, utt_id in enumerate(ids):
            names = [TS_VOCAB[int(t)] for t in y[b, :int(U[b])]]
            words = [wd for wd, _ in word_groups(names, "marker")]
            starts = np.sort(rng.uniform(0, 0.04 * int(T[b]), len(words)))
            ref += [f"{utt_id} 1 {s:.3f} {rng.uniform(0.01, 0.2):.3f} {wd}"
                    for s, wd in zip(starts, words, strict=True)]
    ref_path = tmp_path / "ref.ctm"
    ref_path.write_text("".join(line + "\n" for line in ref), encoding="utf-8")
    return paths, ref_path


def delay_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if line.startswith("emission delay against ") or " offset: mean " in line]


def _timestamps_shards(inputs, out, n, *opts):
    for k in range(n):
        r = invoke("timestamps", *inputs, "--shard", f"{k}/{n}", "-o", out, *opts, "-q")
        assert r.exit_code in (0, 1), r.stderr
        assert not r.stdout
    return [part_path(str(out), Share(k, n)) for k in range(n)]


@pytest.mark.parametrize(("fmt", "opts"), [
    ("tsv", []), ("ctm", ["--window", "1"]), ("lhotse", ["--unit", "token"]),
    ("jsonl", ["--aggregate", "mean", "REF"]), ("ctm", ["--window", "0", "REF"]),
])
def test_timestamps_shards_merged_are_the_single_process_output(timed, tmp_path, fmt, opts):
    inputs, ref = timed
    summary = None
    if "REF" in opts:
        opts = [o for o in opts if o != "REF"] + ["--ref", ref]
    want_summary = tmp_path / "one.json"
    want = invoke("timestamps", *inputs, "-f", fmt, *opts,
                  *(["--summary", want_summary] if "--ref" in opts else []))
    assert want.exit_code == 1, want.stderr  # the NaN utterance
    assert "utterance u19-1: loss is nan" in want.stderr
    out = tmp_path / "t.out"
    parts = _timestamps_shards(inputs, out, 2, "-f", fmt, *opts)
    assert not out.exists()
    if "--ref" in opts:
        summary = tmp_path / "merged.json"
    r = invoke("merge", *parts[::-1], "-o", out,
               *(["--summary", summary] if summary else []))
    assert r.exit_code == 1, r.stderr
    assert out.read_text() == want.stdout
    assert "utterance u19-1: loss is nan" in r.stderr  # merge names it again
    if fmt == "ctm":  # sorted by utterance across the inputs, not by input
        ids = [line.split()[0] for line in want.stdout.splitlines()]
        assert ids == sorted(ids) and len({i[-1] for i in ids[:8]}) > 1
    if summary is not None:
        # Statistics of every share's offsets, bit for bit those of one process.
        assert summary.read_bytes() == want_summary.read_bytes()
        assert delay_lines(r.stderr) == delay_lines(want.stderr) != []
        assert json.loads(summary.read_text())["count"] > 20
    assert invoke("merge", *parts, "-q").stdout == want.stdout  # to stdout


def test_timestamps_merge_takes_another_row_format_but_keeps_ctm(timed, tmp_path):
    inputs, _ = timed
    out = tmp_path / "t.tsv"
    parts = _timestamps_shards(inputs, out, 3, "-f", "tsv")
    want = invoke("timestamps", *inputs, "-f", "csv", "-q").stdout
    assert len(want.splitlines()) > 1  # a header and rows, not an empty output
    assert invoke("merge", *parts, "-f", "csv", "-q").stdout == want
    ctm = tmp_path / "t.ctm"
    parts = _timestamps_shards(inputs, ctm, 2, "-f", "ctm")
    one_line_error(invoke("merge", *parts, "-f", "tsv"), "--format ctm", "not tsv")
    one_line_error(invoke("merge", *parts, "--summary", tmp_path / "s.json"),
                   "made without --ref")


@pytest.mark.parametrize(("own", "into"), [
    ("tsv", "ctm"), ("jsonl", "lhotse"), ("table", "ctm"), ("ctm", "lhotse"),
    ("lhotse", "ctm"), ("lhotse", "json"), ("ctm", "csv")])
def test_timestamps_merge_refuses_a_format_change_into_or_out_of_ctm_and_lhotse(
        timed, tmp_path, own, into):
    inputs, _ = timed
    out = tmp_path / f"t.{own}"
    parts = _timestamps_shards(inputs, out, 2, "-f", own)
    dest = tmp_path / f"merged.{into}"
    r = invoke("merge", *parts, "-f", into, "-o", dest)
    one_line_error(r, f"--format {own}'", f"not {into}")
    assert not dest.exists()


def test_timestamps_torchrun_on_two_cpu_ranks_writes_the_single_process_output(timed,
                                                                               tmp_path):
    inputs, ref = timed
    want = invoke("timestamps", *inputs, "-f", "ctm", "--ref", ref, "--summary",
                  tmp_path / "one.json")
    assert want.exit_code == 1, want.stderr
    out, summary = tmp_path / "tr.ctm", tmp_path / "tr.json"
    r = torchrun("timestamps", *inputs, "-o", out, "-f", "ctm", "--ref", ref,
                 "--summary", summary)
    assert r.returncode != 0  # exit 1 from the ranks (the NaN utterance)
    assert "rnntool: error" not in r.stderr, r.stderr
    assert out.read_text() == want.stdout
    assert summary.read_bytes() == (tmp_path / "one.json").read_bytes()
    assert delay_lines(r.stderr) == delay_lines(want.stderr) != []
    assert r.stderr.count("utterance u19-1: loss is nan") == 1
    assert not list(tmp_path.glob("tr.*.part-*")) and not list(tmp_path.glob(".rnntool-*"))


@pytest.mark.parametrize(("change", "needle"), [
    (["--window", "3"], "--window 2, not 3"),
    (["--aggregate", "prod"], "--aggregate min, not prod"),
    (["--unit", "token"], "--unit word, not token"),
    (["--word-sep", "s"], "--word-sep (not given), not s"),
    (["--channel", "B"], "--channel 1, not B"),
    (["--frame-shift", "0.02"], "--frame-shift (not given), not 0.02"),
    (["-f", "tsv"], "--format ctm, not tsv"),
    (["REF"], "--ref contents"),
])
def test_timestamps_resume_with_other_options_exits_2(timed, tmp_path, change, needle):
    inputs, ref = timed
    out = tmp_path / "t.ctm"
    base = [*inputs, "-o", out, "-f", "ctm", "--shard", "1/2"]
    if change == ["REF"]:
        base += ["--ref", ref]
    assert invoke("timestamps", *base, "-q").exit_code in (0, 1)
    part = part_path(str(out), Share(1, 2))
    before = Path(part).read_text()
    if change == ["REF"]:  # the same name, other times
        ref.write_text(ref.read_text().replace(" 1 0.", " 1 0.0", 1))
        change = []
    r = invoke("timestamps", *base, "--resume", *change)
    one_line_error(r, part, needle, "without --resume")
    assert Path(part).read_text() == before


def test_a_killed_timestamps_share_resumes_to_the_same_output(timed, tmp_path):
    inputs, ref = timed
    want = invoke("timestamps", *inputs, "-f", "lhotse", "--ref", ref, "-q").stdout
    out = tmp_path / "t.jsonl"
    args = ["timestamps", *inputs, "-o", out, "-f", "lhotse", "--ref", ref]
    r = run_cli(*args, "--shard", "0/2", env={**os.environ, "RNNTOOL_TEST_KILL_AFTER": "2"})
    assert r.returncode == -9
    r = run_cli(*args, "--shard", "0/2", "--resume")
    assert r.returncode in (0, 1) and "(2 already done)" in r.stderr, r.stderr
    assert run_cli(*args, "--shard", "1/2", "-q").returncode in (0, 1)
    r = invoke("merge", *(part_path(str(out), Share(k, 2)) for k in range(2)), "-o", out,
               "-q")
    assert r.exit_code == 1 and out.read_text() == want


@pytest.mark.parametrize(("args", "needle"), [
    (["-f", "textgrid", "--out-dir", "D", "--shard", "0/2"], "textgrid is not sharded"),
    (["-f", "textgrid", "--out-dir", "D", "--resume"], "textgrid is not sharded"),
    (["--ref", "REF", "--summary", "s.json", "--shard", "0/2", "-o", "t.tsv"],
     "give it to 'rnntool merge'"),
    (["--shard", "0/2"], "needs -o FILE"),
    (["--resume", "-o", "t.tsv"], "--resume continues a part file"),
])
def test_timestamps_shard_usage_errors_are_one_line(timed, tmp_path, args, needle):
    inputs, ref = timed
    args = [ref if a == "REF" else tmp_path / a if a in ("D", "s.json", "t.tsv") else a
            for a in args]
    one_line_error(invoke("timestamps", *inputs, *args), needle)
    assert not list(tmp_path.glob("t.tsv*")) and not (tmp_path / "s.json").exists()


def test_timestamps_help_tells_of_shards():
    text = invoke("timestamps", "--help").stdout
    assert "--shard K/N" in text and "--resume" in text and "torchrun" in text
    text = invoke("merge", "--help").stdout
    assert "--summary" in text and "timestamps" in text


def _damage(part, change):
    """Rewrite the first utterance record of ``part`` (a complete part file) as
    ``change(record)`` returns it, the header and end line kept."""
    lines = Path(part).read_text(encoding="utf-8").splitlines(keepends=True)
    rec = json.loads(lines[1])
    lines[1] = json.dumps(change(rec)) + "\n"
    Path(part).write_text("".join(lines), encoding="utf-8")


def _rows(change_row):
    def change(rec):
        rec["rows"] = [change_row(dict(r)) for r in rec["rows"]]
        return rec
    return change


HOSTILE_RECORDS = {
    "missing keys": ("score", _rows(lambda r: {"utt_id": r["utt_id"]}), "has no T"),
    "no file": ("score", _rows(lambda r: {k: v for k, v in r.items() if k != "file"}),
                "has no file"),
    "string loss": ("score", _rows(lambda r: {**r, "loss": "0.5"}), "loss is str"),
    "bool T": ("score", _rows(lambda r: {**r, "T": True}), "T is bool"),
    "list utt_id": ("score", _rows(lambda r: {**r, "utt_id": [r["utt_id"]]}),
                    "utt_id is list"),
    "null utt_id": ("score", _rows(lambda r: {**r, "utt_id": None}), "utt_id is NoneType"),
    "dict token": ("align", _rows(lambda r: {**r, "token": {"a": 1}}), "token is dict"),
    "extra key": ("score", _rows(lambda r: {**r, "bogus": 1}), "column \"bogus\""),
    "non-dict row": ("align", lambda rec: {**rec, "rows": [5]}, "a row is int"),
    "string row": ("score", lambda rec: {**rec, "rows": ["utt000"]}, "a row is str"),
    "problem not a string": ("score", lambda rec: {**rec, "info": {"problem": 3}},
                             "problem is not a string"),
    "problem without where": ("align", lambda rec: {**rec, "info": {"problem": "inf"}},
                              "not where"),
    "bad summary": ("align", lambda rec: {**rec, "info": {"summary": [1, 2]}}, "summary"),
}


@pytest.mark.parametrize("case", list(HOSTILE_RECORDS))
def test_a_damaged_part_record_is_one_line_and_nothing_is_written(shards, tmp_path, case):
    command, change, needle = HOSTILE_RECORDS[case]
    out = tmp_path / "s.tsv"
    for k in range(2):
        assert invoke(command, *shards, "--shard", f"{k}/2", "-o", out, "-q").exit_code in (0, 1)
    parts = [part_path(str(out), Share(k, 2)) for k in range(2)]
    _damage(parts[1], change)
    merged = tmp_path / "m.tsv"
    for fmt in ("tsv", "table"):
        one_line_error(invoke("merge", *parts, "-o", merged, "-f", fmt, "-q"),
                       parts[1], "is not an rnntool part file", needle)
    assert not merged.exists() and not list(tmp_path.glob(".rnntool-*"))


@pytest.mark.parametrize(("fmt", "opts", "change", "needle"), [
    ("ctm", [], lambda rec: {**rec, "rows": [["0.1", "u 1 0.1 0.1 w 1.0"]]}, "CTM item"),
    ("ctm", [], lambda rec: {**rec, "rows": [[0.1]]}, "CTM item"),
    ("ctm", [], lambda rec: {**rec, "info": {}}, "without their utterance id"),
    ("lhotse", [], lambda rec: {**rec, "rows": [{"id": "x"}]}, "lhotse line"),
    ("jsonl", ["REF"], lambda rec: {**rec, "info": {"delays": [{"start_offset_ms": "1"}]}},
     "delays"),
    ("tsv", [], _rows(lambda r: {**r, "start": "0.1"}), "start is str"),
])
def test_a_damaged_timestamps_part_is_one_line(timed, tmp_path, fmt, opts, change, needle):
    inputs, ref = timed
    opts = [ref if o == "REF" else o for o in opts]
    opts = ["--ref", *opts] if opts else []
    out = tmp_path / f"t.{fmt}"
    parts = _timestamps_shards(inputs, out, 2, "-f", fmt, *opts)
    _damage(parts[0], change)
    merged = tmp_path / f"m.{fmt}"
    one_line_error(invoke("merge", *parts, "-o", merged, "-q"), parts[0],
                   "is not an rnntool part file", needle)
    assert not merged.exists()


@pytest.mark.parametrize("dump", ["sample.h5", "sample-tdt.h5"])
def test_align_table_title_fits_token_and_arc_rows_single_and_merged(tmp_path, dump):
    """TDT align rows are arcs (tokens and blanks), not token emissions: one title fits
    both, and the merge (which never opens the inputs) gives the single run's."""
    path = ROOT / "sample_data" / dump
    want = invoke("align", path, "-f", "table", "-q").stdout
    assert want.splitlines()[0].strip() == "Alignment (best path)"
    out = tmp_path / "a.txt"
    for k in range(2):
        assert invoke("align", path, "-f", "table", "--shard", f"{k}/2", "-o", out,
                      "-q").exit_code == 0
    parts = [part_path(str(out), Share(k, 2)) for k in range(2)]
    assert invoke("merge", *parts, "-q").stdout == want
