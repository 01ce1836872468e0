"""Lattice dumps end to end: made by ``DumpWriter(kind="lattice")`` and by ``rnntool
compact``, read by score, align, plot and inspect with the results of the full dump
they came from; grad-check refuses them; bad ones are one line and exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import invoke, one_line_error, random_batch, rows_of, write_lattice_raw

from rnntool.analysis import align_utterance
from rnntool.dump import DumpWriter
from rnntool.reader import DumpReader
from rnntool.score import score_reader

VOCAB = [f"tok{v}" for v in range(23)]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
          "float64": torch.float64}


def make_batch(dtype=torch.float32, seed=3, scale=4.0):
    """Five utterances of varied lengths (one with U = 0), V = 23, stored losses and texts."""
    x, y, t_len, u_len = random_batch(5, 9, 5, len(VOCAB), seed=seed, scale=scale, dtype=dtype)
    u_len[3] = 0
    y[3] = -1
    ids = [f"spk{b}-utt" for b in range(5)]
    return x, y.clamp(min=0), t_len, u_len, ids


def write_both(tmp_path, dtype=torch.float32, seed=3, scale=4.0, blank=0, **kw):
    """The same logits as a full dump and as a lattice dump (DumpWriter, CPU)."""
    x, y, t_len, u_len, ids = make_batch(dtype, seed, scale)
    if blank:
        y = torch.where(y == blank, torch.zeros_like(y), y)
    losses = torch.arange(5, dtype=torch.float64) + 10.0
    texts = [f"text {b}" for b in range(5)]
    full, lattice = tmp_path / "full.h5", tmp_path / "lattice.h5"
    for path, kind in ((full, "full"), (lattice, "lattice")):
        with DumpWriter(path, blank=blank, vocab=VOCAB, kind=kind, **kw) as w:
            w.add_batch(x, y, t_len, u_len, ids, losses=losses, texts=texts)
    return full, lattice


def compacted(tmp_path, full, *args):
    out = tmp_path / "compacted.h5"
    r = invoke("compact", full, "-o", out, "-q", *args)
    assert r.exit_code == 0, r.output
    assert r.stdout == ""
    return out


# --------------------------------------------------------------------------- score
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_score_of_a_lattice_dump_is_the_full_dumps_to_the_bit(tmp_path, dtype):
    full, lattice = write_both(tmp_path, DTYPES[dtype])
    out = compacted(tmp_path, full)
    want = invoke("score", full, "-f", "jsonl")
    assert want.exit_code == 0, want.output
    for path in (lattice, out):
        got = invoke("score", path, "-f", "jsonl")
        assert got.exit_code == 0, got.output
        assert got.stdout == want.stdout  # every digit, stored_loss and loss_diff too
    rows = [json.loads(line) for line in want.stdout.splitlines()]
    assert [r["stored_loss"] for r in rows] == [10.0, 11.0, 12.0, 13.0, 14.0]


def test_score_library_bits_and_selection(tmp_path):
    full, lattice = write_both(tmp_path, torch.float32)
    with DumpReader(full) as rf, DumpReader(lattice) as rl:
        assert rl.kind == "lattice" and rf.kind == "full"
        ids = ["spk3-utt", "spk0-utt"]
        a = {r["utt_id"]: r["loss"] for r in score_reader(rf, ids)}
        b = {r["utt_id"]: r["loss"] for r in score_reader(rl, ids, budget_bytes=1)}
        assert a == b and set(a) == set(ids)
    got = invoke("score", lattice, "--utt", "spk2-utt", "--utt", "spk4-utt", "-f", "tsv")
    assert [r["utt_id"] for r in rows_of(got.stdout)] == ["spk2-utt", "spk4-utt"]


def test_a_lattice_made_on_simulated_cuda_scores_as_the_full_dump_on_cuda(tmp_path):
    """The same backend's stage 1 makes the same compact arrays: a lattice dump written
    on (simulated) CUDA scores to the bits of the full dump scored on CUDA."""
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("runs the CUDA kernels in Numba's simulator")
    full, lattice = write_both(tmp_path, torch.float32, backend="cuda")
    with DumpReader(full) as rf, DumpReader(lattice) as rl:
        want = {r["utt_id"]: r["loss"] for r in score_reader(rf, rf.utt_ids, backend="cuda")}
        got = {r["utt_id"]: r["loss"] for r in score_reader(rl, rl.utt_ids)}
        got_cuda = {r["utt_id"]: r["loss"] for r in score_reader(rl, rl.utt_ids,
                                                                 backend="cuda")}
        cpu = {r["utt_id"]: r["loss"] for r in score_reader(rf, rf.utt_ids)}
    assert got == want and got_cuda == want
    for u in want:  # and within float32 rounding of the CPU's own
        assert got[u] == pytest.approx(cpu[u], rel=1e-6)


def test_scoring_never_touches_anything_of_size_V(tmp_path):
    """A lattice dump of a 2**40-token vocabulary scores: nothing of T*U*V exists."""
    x, y, t_len, u_len, ids = make_batch()
    with DumpWriter(tmp_path / "l.h5", blank=0, kind="lattice") as w:
        w.add_batch(x, y, t_len, u_len, ids)
    import h5py

    with h5py.File(tmp_path / "l.h5", "r+") as f:
        f.attrs["vocab_size"] = 2**40
    r = invoke("score", tmp_path / "l.h5", "-f", "tsv", "-q")
    assert r.exit_code == 0, r.output
    assert len(rows_of(r.stdout)) == 5


# --------------------------------------------------------------------------- align, plot
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_align_of_a_lattice_dump_is_the_full_dumps(tmp_path, dtype):
    full, lattice = write_both(tmp_path, DTYPES[dtype])
    out = compacted(tmp_path, full)
    want = invoke("align", full, "-f", "tsv")
    assert want.exit_code == 0 and len(rows_of(want.stdout)) > 10
    for path in (lattice, out):
        assert invoke("align", path, "-f", "tsv").stdout == want.stdout


@pytest.mark.parametrize("dtype,scale", [("float32", 4.0), ("float64", 4.0), ("float32", 12.0),
                                         ("float16", 4.0)])
def test_gradient_norms_of_a_lattice_match_the_full_gradient(tmp_path, dtype, scale):
    """The plot's gradient-norm panel from a lattice dump's three arrays against the
    norm of the engine's full gradient, node by node; scale 12 makes rows peaked (a
    trained model's), where the sum of p_v^2 written as one expression would cancel.
    (float16 logits: the full gradient is itself rounded to float16.)"""
    full, lattice = write_both(tmp_path, DTYPES[dtype], scale=scale)
    rtol = {"float64": 1e-9, "float32": 2e-5, "float16": 2e-3}[dtype]
    with DumpReader(full) as rf, DumpReader(lattice) as rl:
        for u in rf.utt_ids:
            a = align_utterance(rf, rf.read(u), grad_norms=True)
            b = align_utterance(rl, rl.read_lattice(u), grad_norms=True)
            np.testing.assert_array_equal(a.alignment.occupancy, b.alignment.occupancy)
            np.testing.assert_array_equal(a.alignment.path, b.alignment.path)
            occ = a.alignment.occupancy
            # float32 rounding of a gradient entry is relative to the node's occupancy;
            # and below float32's range (1e-38) the full gradient is 0.
            atol = {"float64": 1e-14, "float32": 1e-6, "float16": 2e-3}[dtype] * occ
            # float16 gradients are rounded to float16 (subnormals below 6e-8).
            atol += {"float64": 0.0, "float32": 1e-30, "float16": 5e-7}[dtype]
            assert np.all(np.abs(a.grad_norm - b.grad_norm) <= atol + rtol * a.grad_norm), u


def test_gradient_norms_of_log_prob_dumps(tmp_path):
    """input_kind=log_probs: the gradient w.r.t. log-probs has no softmax term."""
    x, y, t_len, u_len, ids = make_batch(torch.float64)
    lp = torch.log_softmax(x, -1)
    for kind in ("full", "lattice"):
        with DumpWriter(tmp_path / f"{kind}.h5", blank=0, kind=kind,
                        input_kind="log_probs") as w:
            w.add_batch(lp, y, t_len, u_len, ids)
    with DumpReader(tmp_path / "full.h5") as rf, DumpReader(tmp_path / "lattice.h5") as rl:
        for u in ids:
            a = align_utterance(rf, rf.read(u), grad_norms=True)
            b = align_utterance(rl, rl.read_lattice(u), grad_norms=True)
            np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-9, atol=1e-14)


def test_plot_of_a_lattice_dump(tmp_path):
    full, lattice = write_both(tmp_path, torch.float32)
    r = invoke("plot", lattice, "-d", tmp_path / "png", "-q")
    assert r.exit_code == 0, r.output
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert pngs == [f"spk{b}-utt.png" for b in range(5)]
    assert all((tmp_path / "png" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# --------------------------------------------------------------------------- inspect, grad-check
def test_inspect_says_the_kind(tmp_path):
    full, lattice = write_both(tmp_path, torch.float16)
    facts = {}
    for path in (full, lattice):
        r = invoke("inspect", path, "-f", "json")
        assert r.exit_code == 0, r.output
        (facts[path],) = json.loads(r.stdout)
    assert facts[full]["kind"] == "full" and facts[lattice]["kind"] == "lattice"
    for k in ("utterances", "T_min", "T_max", "U_min", "U_max", "V_min", "V_max",
              "with_stored_loss", "blank", "vocab_size"):
        assert facts[full][k] == facts[lattice][k], k
    assert facts[lattice]["dtypes"] == "float32"
    assert facts[lattice]["size_bytes"] > 0
    both = rows_of(invoke("inspect", full, lattice, "-f", "tsv").stdout)
    assert [r["kind"] for r in both] == ["full", "lattice"]


def test_grad_check_refuses_a_lattice_dump(tmp_path):
    full, lattice = write_both(tmp_path)
    one_line_error(invoke("grad-check", lattice), str(lattice), "lattice dump",
                   "grad-check needs the full logits")
    one_line_error(invoke("grad-check", full, lattice), str(lattice), "lattice dump")


# --------------------------------------------------------------------------- compact
def test_compact_of_a_padded_dump_and_a_selection(tmp_path):
    from helpers import write_padded

    x, y, t_len, u_len, ids = make_batch(torch.float32)
    write_padded(tmp_path / "padded.h5", x.numpy(), y.numpy(), t_len.numpy(), u_len.numpy(),
                 utt_ids=ids, blank=0)
    out = compacted(tmp_path, tmp_path / "padded.h5", "--utt", "spk1-utt", "--utt", "spk4-utt")
    with DumpReader(out) as r:
        assert r.kind == "lattice" and sorted(r.utt_ids) == ["spk1-utt", "spk4-utt"]
    want = invoke("score", tmp_path / "padded.h5", "--utt", "spk1-utt", "--utt", "spk4-utt",
                  "-f", "tsv")
    got = invoke("score", out, "--utt", "spk1-utt", "--utt", "spk4-utt", "-f", "tsv")
    assert got.stdout == want.stdout


def test_compact_refusals(tmp_path):
    full, lattice = write_both(tmp_path)
    one_line_error(invoke("compact", lattice, "-o", tmp_path / "x.h5"), "already a lattice")
    one_line_error(invoke("compact", full, "-o", "-"), "HDF5 file")
    one_line_error(invoke("compact", full, "-o", full))
    one_line_error(invoke("compact", full, "-o", tmp_path / "x.h5", "--dtype", "float16"),
                   "--dtype")
    assert not (tmp_path / "x.h5").exists()


def test_compact_of_nan_logits_is_one_line_naming_file_and_utterance(tmp_path):
    x, y, t_len, u_len, ids = make_batch(torch.float32)
    x[2, 1, 0, 3] = float("nan")
    with DumpWriter(tmp_path / "full.h5", blank=0) as w:
        w.add_batch(x, y, t_len, u_len, ids)
    out = tmp_path / "out.h5"
    one_line_error(invoke("compact", tmp_path / "full.h5", "-o", out), "full.h5", "spk2-utt",
                   "NaN")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.h5"]


def test_an_interrupted_compact_leaves_no_file(tmp_path, monkeypatch):
    """Ctrl-C after the first batch was written: exit 130, no output, no temporary file."""
    import rnntool.compact as compact_module

    real = compact_module.compact_dump

    def interrupted(reader, ids, writer, **kw):
        def on_batch(n):
            raise KeyboardInterrupt

        return real(reader, ids, writer, **dict(kw, on_batch=on_batch))

    monkeypatch.setattr(compact_module, "compact_dump", interrupted)
    full, lattice = write_both(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke("compact", full, "-o", tmp_path / "out.h5", "--batch-mb", "0")
    assert r.exit_code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------- bad lattice dumps
def good_lattice_utt(T=4, U=2):
    rng = np.random.default_rng(0)  # P(blank) + P(next label) <= 0.95: a distribution
    return {"blank_lp": np.log(rng.uniform(0.05, 0.5, (T, U + 1))).astype(np.float32),
            "emit_lp": np.log(rng.uniform(0.05, 0.45, (T, U))).astype(np.float32),
            "log_p2_others": -rng.random((T, U + 1), np.float32) - 1,
            "labels": np.array([1, 2][:U])}


@pytest.mark.parametrize("command", ["score", "align", "plot"])
@pytest.mark.parametrize("how,needle", [
    ("shape", "emit_lp has shape (4, 3)"),
    ("nan", "blank_lp[t=1, u=2] = nan"),
    ("label", "labels[1] = 9 is outside [0, 5)"),
])
def test_a_bad_lattice_dump_is_one_line(tmp_path, command, how, needle):
    bad = good_lattice_utt()
    if how == "shape":
        bad["emit_lp"] = np.zeros((4, 3), np.float32)
    elif how == "nan":
        bad["blank_lp"][1, 2] = np.nan
    else:
        bad["labels"] = np.array([1, 9])
    path = tmp_path / "bad.h5"
    write_lattice_raw(path, {"good": good_lattice_utt(), "u1": bad})
    extra = ["-d", tmp_path / "png"] if command == "plot" else ["-o", tmp_path / "out.tsv"]
    one_line_error(invoke(command, path, *extra), "bad.h5", "utterance u1", needle)
    assert not (tmp_path / "out.tsv").exists()


def test_the_bundled_lattice_sample_scores_as_the_full_sample():
    """sample_data/sample-lattice.h5 is sample.h5 as a
    lattice dump: the same rows to the last digit, the same alignments."""
    from helpers import SAMPLE

    lattice = SAMPLE.with_name("sample-lattice.h5")
    for cmd in ("score", "align"):
        want = invoke(cmd, SAMPLE, "-f", "tsv")
        got = invoke(cmd, lattice, "-f", "tsv")
        assert want.exit_code == got.exit_code == 0
        assert got.stdout == want.stdout and len(rows_of(got.stdout)) >= 24
    with DumpReader(lattice) as r:
        assert r.kind == "lattice" and len(r) == 24 and r.vocab is not None


def test_inspect_flags_lattice_log_probs_no_distribution_has(tmp_path):
    """A lattice whose log-probs exceed 0, or whose blank and next-label probabilities sum
    above 1, can still give a positive loss (score cannot see it): inspect names it."""
    over = good_lattice_utt()
    over["blank_lp"][2, 1] = 0.5
    mass = good_lattice_utt()
    mass["blank_lp"][1, 0], mass["emit_lp"][1, 0] = np.log(0.7), np.log(0.6)
    path = tmp_path / "odd.h5"
    write_lattice_raw(path, {"good": good_lattice_utt(), "over": over, "mass": mass})
    result = invoke("inspect", path, "-f", "tsv")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert any("utterance over: blank_lp reaches 0.5" in ln for ln in lines)
    assert any("utterance mass: log(P(blank) + P(next label)) reaches" in ln for ln in lines)
    assert not any("utterance good" in ln for ln in lines)


def test_score_stops_on_bad_input_before_writing_anything(tmp_path):
    """Bad input in the first window: exit 2 and stdout empty (the header waits for rows)."""
    bad = good_lattice_utt()
    bad["labels"] = np.array([1, 9])
    path = tmp_path / "bad.h5"
    write_lattice_raw(path, {"u1": bad})
    result = invoke("score", path, "-f", "tsv")
    one_line_error(result, "labels[1] = 9")
    assert result.stdout == ""
