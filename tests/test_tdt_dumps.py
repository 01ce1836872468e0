"""TDT dumps: the root attributes model_kind and durations, and the commands that read
them (score, align, plot, inspect), against tdt_loss and the float64 reference
(tdt_reference_loss, tdt_reference_viterbi, brute-force path enumeration), on every
backend (the `backend` fixture: the CPU, and the CUDA kernels in Numba's simulator).
Every dump is built here, in tmp_path."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from helpers import examples, invoke, one_line_error, rows_of, write_keyed_raw, write_padded_raw
from hypothesis import given, settings
from hypothesis import strategies as st

from rnntool.analysis import ALIGN_TDT_FIELDS, align_utterance
from rnntool.dump import DumpError, DumpWriter
from rnntool.reader import DumpReader
from rnntool.score import score_reader
from rnntool.tdt import check_durations, tdt_loss
from rnntool.tdt_reference import (
    tdt_enumerate_paths,
    tdt_reference_gradients,
    tdt_reference_loss,
    tdt_reference_viterbi,
)

DURATIONS = [0, 1, 2, 3]


def tdt_align(*args, **kw):
    """``rnntool.align.tdt_align``, imported when called: importing the submodule
    ``rnntool.align`` at collection, before another test file's ``from rnntool import
    align`` resolves the package's lazy ``align`` function, would leave that name the
    module (rnntool/__init__.py) and break those files."""
    from rnntool.align import tdt_align as run

    return run(*args, **kw)


def _random_utts(shapes, V, D, *, blank, seed=0, dtype=np.float32, scale=2.0):
    """``{utt_id: (logits (T, U+1, V + D), labels (U,))}`` with labels never the blank."""
    rng = np.random.default_rng(seed)
    blank = blank % V
    tokens = [v for v in range(V) if v != blank]
    return {f"u{i}": ((scale * rng.standard_normal((T, U + 1, V + D))).astype(dtype),
                      rng.choice(tokens, U).astype(np.int64))
            for i, (T, U) in enumerate(shapes)}


def _write(path, utts, *, durations=DURATIONS, blank=0, **kw):
    with DumpWriter(path, blank=blank, model_kind="tdt", durations=durations, **kw) as w:
        for utt_id, (x, y) in utts.items():
            w.add(utt_id, x, y)
    return path


def _tdt_loss_of(x, y, durations, blank, dtype=torch.float64, backend="cpu"):
    """tdt_loss of one utterance (logits (T, U+1, V + D), labels (U,))."""
    xt = torch.from_numpy(x)[None].to(dtype)
    yt = torch.from_numpy(y if y.size else np.zeros(1, np.int64))[None]
    return float(tdt_loss(xt, yt, torch.tensor([x.shape[0]]), torch.tensor([y.size]),
                          durations=durations, blank=blank, reduction="none",
                          backend=backend)[0])


# --------------------------------------------------------------------------- the format
def test_round_trip_attributes_and_shapes(tmp_path):
    utts = _random_utts([(5, 2), (3, 0)], V=6, D=4, blank=-1)
    path = _write(tmp_path / "t.h5", utts, blank=-1, vocab=[f"t{v}" for v in range(6)])
    with h5py.File(path) as f:
        assert f.attrs["model_kind"] == "tdt"
        assert f.attrs["durations"].tolist() == DURATIONS
        assert f.attrs["durations"].dtype == np.int64
        assert f.attrs["vocab_size"] == 6  # tokens only
    with DumpReader(path) as r:
        assert (r.model_kind, r.durations, r.vocab_size) == ("tdt", tuple(DURATIONS), 6)
        info = r.info("u0")
        assert (info.V, info.D, info.width) == (6, 4, 10)
        one = r.read("u0")
        np.testing.assert_array_equal(one.logits, utts["u0"][0])
        np.testing.assert_array_equal(one.labels, utts["u0"][1])


def test_rnnt_dumps_say_rnnt_and_absent_means_rnnt(tmp_path):
    x = np.zeros((2, 2, 4), np.float32)
    with DumpWriter(tmp_path / "r.h5") as w:
        w.add("a", x, np.array([1]))
    with h5py.File(tmp_path / "r.h5") as f:
        assert f.attrs["model_kind"] == "rnnt" and "durations" not in f.attrs
    write_keyed_raw(tmp_path / "old.h5", {"a": (x, np.array([1]))}, blank=0)
    with DumpReader(tmp_path / "old.h5") as r:
        assert (r.model_kind, r.durations) == ("rnnt", None)
        assert r.info("a").width == 4


def test_writer_checks_durations_as_tdt_loss_does(tmp_path):
    for bad in ([0, 2, 4], [0, 1, 1], [1, 0], [], [0, -1, 1]):
        with pytest.raises(ValueError) as mine:
            DumpWriter(tmp_path / "x.h5", model_kind="tdt", durations=bad)
        with pytest.raises(ValueError) as theirs:
            check_durations(bad)
        assert str(mine.value) == str(theirs.value)
    with pytest.raises(TypeError, match="durations"):
        DumpWriter(tmp_path / "x.h5", model_kind="tdt", durations="0,1")
    with pytest.raises(TypeError, match=r"durations\[0\] must be an integer"):
        DumpWriter(tmp_path / "x.h5", model_kind="tdt", durations=np.array([0.0, 1.0]))
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("kwargs, needle", [
    ({"model_kind": "tdt"}, "needs durations"),
    ({"durations": [0, 1]}, "model_kind='tdt' only"),
    ({"model_kind": "ctc"}, "model_kind must be one of"),
    ({"model_kind": "tdt", "durations": [0, 2], "kind": "lattice"}, "must contain 0 and 1"),
])
def test_writer_refuses_bad_options(tmp_path, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DumpWriter(tmp_path / "x.h5", **kwargs)
    assert not list(tmp_path.iterdir())


def test_writer_checks_the_last_dim_is_v_plus_d(tmp_path):
    with DumpWriter(tmp_path / "x.h5", model_kind="tdt", durations=DURATIONS, vocab_size=5) as w:
        w.add("ok", np.zeros((2, 1, 9), np.float32), np.array([], np.int64))
        with pytest.raises(ValueError, match=r"last dim is 8.*V \+ D = 5 \+ 4 = 9"):
            w.add("short", np.zeros((2, 1, 8), np.float32), np.array([], np.int64))
    with DumpWriter(tmp_path / "y.h5", model_kind="tdt", durations=DURATIONS) as w:
        with pytest.raises(ValueError, match="last dim is 4.*V >= 1"):
            w.add("none", np.zeros((2, 1, 4), np.float32), np.array([], np.int64))
        with pytest.raises(ValueError, match=r"labels\[0\] = 5 is out of range"):
            # V = 9 - 4 = 5 tokens: a label 5 is a duration logit's index, not a token.
            w.add("label", np.zeros((2, 2, 9), np.float32), np.array([5]))


BAD_ROOTS = [
    ({"durations": np.array([0, 2, 4])}, "durations must contain 0 and 1"),
    ({"durations": np.array([0, 1, 1])}, "strictly ascending"),
    ({"durations": np.array([0.0, 1.0])}, "not a 1-D integer array"),
    ({"durations": np.array([[0, 1]])}, "not a 1-D integer array"),
    ({"durations": None}, "no attribute durations"),
    ({"model_kind": "ctc"}, "model_kind = 'ctc' is not one of rnnt, tdt"),
]


@pytest.mark.parametrize("attrs, needle", BAD_ROOTS)
def test_bad_stored_model_attributes_are_one_line(tmp_path, attrs, needle):
    root = {"blank": 0, "model_kind": "tdt", "durations": np.array([0, 1, 2]), **attrs}
    path = tmp_path / "bad.h5"
    write_keyed_raw(path, {"a": (np.zeros((2, 2, 8), np.float32), np.array([1]))},
                    **{k: v for k, v in root.items() if v is not None})
    with pytest.raises(DumpError, match=needle):
        DumpReader(path)
    for cmd in ("score", "align", "inspect"):
        one_line_error(invoke(cmd, path), "bad.h5", needle)


# --------------------------------------------------------------------------- score
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_score_matches_tdt_loss_and_the_reference(tmp_path, backend, dtype):
    durations = [0, 1, 2]
    shapes = [(5, 2), (1, 0), (4, 3), (6, 1)]
    utts = _random_utts(shapes, V=5, D=3, blank=-1, seed=3, dtype=dtype)
    path = _write(tmp_path / "t.h5", utts, durations=durations, blank=-1)
    with h5py.File(path, "a") as f:
        f["utts/u0"].attrs["loss"] = 1.5
    with DumpReader(path) as r:
        rows = {row["utt_id"]: row for row in score_reader(r, r.utt_ids, backend=backend)}
    torch_dtype = torch.float64 if dtype == np.float64 else torch.float32
    for utt_id, (x, y) in utts.items():
        row = rows[utt_id]
        assert row["_problem"] is None
        ref = float(tdt_reference_loss(torch.from_numpy(x)[None].double(),
                                       torch.from_numpy(y if y.size else np.zeros(1, np.int64))[None],
                                       torch.tensor([x.shape[0]]), torch.tensor([y.size]),
                                       durations=durations, blank=-1)[0])
        assert row["loss"] == pytest.approx(ref, rel=1e-5 if dtype == np.float32 else 1e-10)
        # The same bits as tdt_loss on the same backend.
        assert row["loss"] == _tdt_loss_of(x, y, durations, -1, torch_dtype, backend)
    assert rows["u0"]["stored_loss"] == 1.5
    assert rows["u0"]["loss_diff"] == rows["u0"]["loss"] - 1.5


def test_padded_layout_scores_as_keyed(tmp_path):
    utts = _random_utts([(4, 2), (3, 1)], V=5, D=4, blank=0, seed=5)
    keyed = _write(tmp_path / "k.h5", utts)
    x = np.zeros((2, 4, 3, 9), np.float32)
    y = np.zeros((2, 2), np.int64)
    for b, (xb, yb) in enumerate(utts.values()):
        x[b, : xb.shape[0], : xb.shape[1]] = xb
        y[b, : yb.size] = yb
    padded = tmp_path / "p.h5"
    write_padded_raw(padded, x, y, np.array([4, 3]), np.array([2, 1]), blank=0,
                     model_kind="tdt", durations=np.array(DURATIONS))
    with DumpReader(padded) as r:
        assert r.vocab_size == 5 and r.info("0").width == 9
    results = [invoke("score", p, "--format", "tsv") for p in (keyed, padded)]
    assert [r.exit_code for r in results] == [0, 0], [r.stderr for r in results]
    a, b = (rows_of(r.stdout) for r in results)
    assert len(a) == 2 and [r["loss"] for r in a] == [r["loss"] for r in b]


def test_a_label_indexing_a_duration_logit_is_one_line(tmp_path):
    # V = 9 - 4 = 5 tokens: label 5 would be the first duration logit.
    path = tmp_path / "lab.h5"
    write_keyed_raw(path, {"a": (np.zeros((3, 2, 9), np.float32), np.array([5]))}, blank=0,
                    model_kind="tdt", durations=np.array(DURATIONS))
    one_line_error(invoke("score", path), "lab.h5", "utterance a", "labels[0] = 5")


def test_negative_loss_tolerance_is_tdt_s():
    from rnntool.lattice import negative_loss_tolerance
    from rnntool.score import loss_problem

    rnnt_tol = negative_loss_tolerance(100, 20)
    loss = -1.5 * rnnt_tol  # beyond RNN-T's allowance, within TDT's (two log-probs an arc)
    assert "below 0" in loss_problem(loss, 100, 20)
    assert loss_problem(loss, 100, 20, tdt=True) is None
    assert "below 0" in loss_problem(-2.5 * rnnt_tol, 100, 20, tdt=True)


# --------------------------------------------------------------------------- align
# A joint peaked on one path: its arcs (t, u, token, duration), known in advance.
PEAKED_ARCS = [(0, 0, "y", 0), (0, 1, "y", 2), (2, 2, "b", 3), (5, 2, "y", 1), (6, 3, "b", 2)]
PEAKED_T, PEAKED_LABELS, PEAKED_V, PEAKED_BLANK = 8, [3, 1, 4], 6, 0


def _peaked_logits(height=12.0):
    D = len(DURATIONS)
    x = np.zeros((PEAKED_T, len(PEAKED_LABELS) + 1, PEAKED_V + D), np.float32)
    arcs = []
    for t, u, kind, d in PEAKED_ARCS:
        token = PEAKED_LABELS[u] if kind == "y" else PEAKED_BLANK
        x[t, u, token] = height
        x[t, u, PEAKED_V + DURATIONS.index(d)] = height
        arcs.append((t, u, token, d))
    return x, np.array(PEAKED_LABELS), arcs


def test_align_finds_the_peaked_path_on_every_backend(tmp_path, backend):
    x, y, arcs = _peaked_logits()
    path = _write(tmp_path / "p.h5", {"peaked": (x, y)}, blank=PEAKED_BLANK)
    with DumpReader(path) as r:
        aligned = align_utterance(r, r.read("peaked"), backend=backend)
    al = aligned.alignment
    assert al.arcs.tolist() == [list(a) for a in arcs]
    best, ref_arcs = tdt_reference_viterbi(torch.from_numpy(x).double(), torch.from_numpy(y),
                                           durations=DURATIONS, blank=PEAKED_BLANK)
    assert [tuple(a) for a in al.arcs.tolist()] == ref_arcs
    assert al.best_log_prob == pytest.approx(best, abs=1e-4)
    assert al.frames.tolist() == [0, 0, 5] and al.token_durations.tolist() == [0, 2, 1]
    assert (al.frame_posteriors > 0.99).all()
    assert al.path.tolist() == [[0, 0], [0, 1], [2, 2], [5, 2], [6, 3], [8, 3]]
    rows = aligned.rows()
    assert [(r["kind"], r["position"], r["frame"], r["duration"]) for r in rows] == [
        ("token", 0, 0, 0), ("token", 1, 0, 2), ("blank", 2, 2, 3), ("token", 2, 5, 1),
        ("blank", 3, 6, 2)]
    assert [r["token_id"] for r in rows] == [3, 1, 0, 4, 0]
    assert all(r["expected_frame"] is None for r in rows if r["kind"] == "blank")


def test_align_command_rows(tmp_path):
    x, y, _ = _peaked_logits()
    vocab = ["<b>", "a", "b", "c", "d", "e"]
    path = _write(tmp_path / "p.h5", {"peaked": (x, y)}, blank=PEAKED_BLANK, vocab=vocab)
    result = invoke("align", path, "--format", "tsv")
    assert result.exit_code == 0, result.stderr
    rows = rows_of(result.stdout)
    assert list(rows[0]) == ALIGN_TDT_FIELDS
    assert [(r["kind"], r["token"], r["frame"], r["duration"]) for r in rows] == [
        ("token", "c", "0", "0"), ("token", "a", "0", "2"), ("blank", "<b>", "2", "3"),
        ("token", "d", "5", "1"), ("blank", "<b>", "6", "2")]
    assert rows[2]["expected_frame"] == "" and rows[2]["frame_posterior"] == ""


def test_align_random_matches_the_reference_viterbi(backend):
    @settings(max_examples=examples(backend, cuda=6))
    @given(T=st.integers(1, 7), U=st.integers(0, 4), V=st.integers(2, 5),
           durations=st.sampled_from([[0, 1], [0, 1, 2], [0, 1, 2, 3, 4]]),
           blank_last=st.booleans(), seed=st.integers(0, 2**16))
    def check(T, U, V, durations, blank_last, seed):
        blank = -1 if blank_last else 0
        (x, y), = _random_utts([(T, U)], V, len(durations), blank=blank, seed=seed,
                               dtype=np.float64).values()
        (al,) = tdt_align(torch.from_numpy(x)[None],
                          torch.from_numpy(y if U else np.zeros(1, np.int64))[None],
                          torch.tensor([T]), torch.tensor([U]), durations=durations,
                          blank=blank, backend=backend)
        best, arcs = tdt_reference_viterbi(torch.from_numpy(x), torch.from_numpy(y),
                                           durations=durations, blank=blank)
        assert al.best_log_prob == pytest.approx(best, abs=1e-9)
        assert [tuple(a) for a in al.arcs.tolist()] == arcs
        assert al.frames.tolist() == [a[0] for a in arcs if a[2] != blank % V]
        assert al.path[-1].tolist() == [T, U]
        np.testing.assert_allclose(al.emit_posteriors.sum(0), 1.0, rtol=1e-9)

    check()


def test_cpu_and_cuda_alignments_agree():
    from rnntool import cuda as rcuda

    if not rcuda.SIMULATOR:
        pytest.skip("runs the CUDA kernels in Numba's simulator")
    rng = np.random.default_rng(7)
    x = torch.from_numpy(3 * rng.standard_normal((3, 9, 4, 6 + 5)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 5, (3, 3)))
    t_len, u_len = torch.tensor([9, 6, 8]), torch.tensor([3, 2, 0])
    cpu, gpu = (tdt_align(x, y, t_len, u_len, durations=[0, 1, 2, 3, 4], blank=-1,
                          backend=b) for b in ("cpu", "cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        # The same path; numbers to float32 rounding (stage 1's log-probs are float32).
        assert a.arcs.tolist() == b.arcs.tolist()
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert a.best_log_prob == pytest.approx(b.best_log_prob, rel=1e-6)
        for name in ("emit_posteriors", "blank_posteriors", "occupancy", "expected_frames"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-5)


def test_posteriors_match_brute_force_enumeration(backend):
    durations = [0, 1, 2]
    (x, y), = _random_utts([(4, 2)], V=4, D=3, blank=0, seed=11, dtype=np.float64).values()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    paths = list(tdt_enumerate_paths(xt, yt, durations=durations, blank=0))
    log_p = np.logaddexp.reduce([lp for lp, _ in paths])
    emit = np.zeros((4, 2))
    blank_post = np.zeros((4, 3))
    occ = np.zeros((4, 3))
    for lp, arcs in paths:
        w = math.exp(lp - log_p)
        for t, u, token, _ in arcs:
            occ[t, u] += w
            if token == 0:
                blank_post[t, u] += w
            else:
                emit[t, u] += w
    (al,) = tdt_align(xt[None], yt[None], torch.tensor([4]), torch.tensor([2]),
                      durations=durations, blank=0, backend=backend)
    assert al.loss == pytest.approx(-log_p, rel=1e-12)
    np.testing.assert_allclose(al.emit_posteriors, emit, atol=1e-12)
    np.testing.assert_allclose(al.blank_posteriors, blank_post, atol=1e-12)
    np.testing.assert_allclose(al.occupancy, occ, atol=1e-12)
    np.testing.assert_allclose(al.expected_frames, (np.arange(4)[:, None] * emit).sum(0),
                               atol=1e-12)


# --------------------------------------------------------------------------- plot
def test_plot_draws_the_path_with_its_jumps(tmp_path):
    from rnntool.plots import build_figure

    x, y, _ = _peaked_logits()
    path = _write(tmp_path / "p.h5", {"peaked": (x, y)}, blank=PEAKED_BLANK)
    with DumpReader(path) as r:
        aligned = align_utterance(r, r.read("peaked"), grad_norms=True)
    al = aligned.alignment
    assert aligned.grad_norm.shape == (PEAKED_T, 4) and np.isfinite(aligned.grad_norm).all()
    fig = build_figure(utt_id="peaked", loss=al.loss, best_log_prob=al.best_log_prob,
                       occupancy=al.occupancy, best_path=al.path, grad_norm=aligned.grad_norm,
                       path_markers=True)
    line = fig.axes[0].lines[0]
    assert line.get_xydata().tolist() == [[0, 0], [0, 1], [2, 2], [5, 2], [6, 3], [8, 3]]
    assert line.get_marker() == "."
    result = invoke("plot", path, "-d", tmp_path / "png", "-q")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "png" / "peaked.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- timestamps
def test_timestamps_last_max_duration_1_frames(tmp_path, backend):
    from rnntool.timestamps import timestamps

    x, y, _ = _peaked_logits()
    vocab = ["<b>", "a", "b", "c", "d", "e"]
    path = _write(tmp_path / "p.h5", {"peaked": (x, y)}, blank=PEAKED_BLANK, vocab=vocab,
                  frame_shift=0.04)
    with DumpReader(path) as r:
        times = timestamps(r, r.read("peaked"), backend=backend, unit="token")
    # Emission frames 0, 0, 5 with durations 0, 2, 1: ends 0 + 1, 0 + 2, 5 + 1 frames.
    got = [(t.token, t.start_frame, t.end_frame) for t in times.tokens]
    assert got == [("c", 0, 1), ("a", 0, 2), ("d", 5, 6)]
    assert [t.end for t in times.tokens] == pytest.approx([0.04, 0.08, 0.24])
    tok = times.tokens[1]
    assert tok.expected_end - tok.expected_start == pytest.approx(2 * 0.04)
    assert all(t.window_posterior > 0.99 for t in times.tokens)
    result = invoke("timestamps", path, "--unit", "token", "-f", "ctm")
    assert result.exit_code == 0, result.stderr
    assert [line.split()[2:4] for line in result.stdout.splitlines()] == [
        ["0.000", "0.040"], ["0.000", "0.080"], ["0.200", "0.040"]]


# --------------------------------------------------------------------------- inspect
def test_inspect_shows_model_kind_and_durations(tmp_path):
    utts = _random_utts([(3, 1), (5, 2)], V=5, D=4, blank=0)
    path = _write(tmp_path / "t.h5", utts)
    result = invoke("inspect", path, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)
    assert (row["model_kind"], row["durations"], row["vocab_size"]) == ("tdt", "0,1,2,3", 5)
    assert (row["V_min"], row["V_max"]) == (5, 5)
    rnnt = tmp_path / "r.h5"
    with DumpWriter(rnnt) as w:
        w.add("a", np.zeros((2, 2, 4), np.float32), np.array([1]))
    row = json.loads(invoke("inspect", rnnt, "--format", "jsonl").stdout)
    assert (row["model_kind"], row["durations"]) == ("rnnt", None)


def test_inspect_checks_tokens_and_durations_normalise_separately(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 9))
    tok = x[..., :5] - np.logaddexp.reduce(x[..., :5], axis=-1, keepdims=True)
    dur = x[..., 5:] - np.logaddexp.reduce(x[..., 5:], axis=-1, keepdims=True)
    good = np.concatenate([tok, dur], -1)
    path = tmp_path / "lp.h5"
    with DumpWriter(path, input_kind="log_probs", model_kind="tdt", durations=DURATIONS) as w:
        w.add("good", good, np.array([2]))
        w.add("bad", np.concatenate([tok, dur + 0.5], -1), np.array([2]))
    result = invoke("inspect", path, "--format", "jsonl")
    assert result.exit_code == 1
    err = result.stderr.strip().splitlines()
    assert any("utterance bad:" in e and "durations: " in e and "do not normalise" in e for e in err), err
    assert not any("utterance good" in e for e in err), err


# --------------------------------------------------------------------------- the sample
def test_sample_tdt_dump_scores_to_its_trainers_losses():
    from helpers import ROOT

    path = ROOT / "sample_data" / "sample-tdt.h5"
    assert path.stat().st_size < 200_000
    result = invoke("score", path, "--format", "tsv", "-q")
    assert result.exit_code == 0, result.stderr
    rows = rows_of(result.stdout)
    assert len(rows) == 12
    # stored_loss is the trainer's own tdt_loss (scripts/make_tdt_sample.py).
    assert all(abs(float(r["loss_diff"])) < 1e-5 for r in rows)
    rows = rows_of(invoke("align", path, "--utt", "utt004", "--format", "tsv").stdout)
    tokens = [r for r in rows if r["kind"] == "token"]
    assert [(r["token"], r["frame"], r["duration"]) for r in tokens] == [
        ("j", "0", "3"), ("b", "4", "1"), ("g", "8", "1")]


def test_the_bundled_tdt_lattice_sample_is_the_tdt_sample_compacted(tmp_path):
    """sample_data/sample-tdt-lattice.h5 is `rnntool compact` of sample-tdt.h5: the same
    stored arrays as compacting it again gives, and the same score, align and
    timestamps rows to the last digit."""
    from helpers import ROOT

    full = ROOT / "sample_data" / "sample-tdt.h5"
    lattice = full.with_name("sample-tdt-lattice.h5")
    assert lattice.stat().st_size < 100_000
    again = tmp_path / "again.h5"
    assert invoke("compact", full, "-o", again, "--device", "cpu", "-q").exit_code == 0
    with h5py.File(lattice) as f, h5py.File(again) as g:
        assert sorted(f["utts"]) == sorted(g["utts"])
        for u in f["utts"]:
            for name in ("blank_lp", "emit_lp", "dur_lp", "labels"):
                np.testing.assert_array_equal(f["utts"][u][name][()], g["utts"][u][name][()])
    for cmd, extra in (("score", ()), ("align", ()), ("timestamps", ("--frame-shift", "0.04"))):
        want = invoke(cmd, full, "-f", "tsv", "-q", *extra)
        got = invoke(cmd, lattice, "-f", "tsv", "-q", *extra)
        assert want.exit_code == got.exit_code == 0, (want.stderr, got.stderr)
        assert got.stdout == want.stdout and len(rows_of(got.stdout)) >= 12
    with DumpReader(lattice) as r:
        assert (r.kind, r.model_kind, len(r)) == ("lattice", "tdt", 12)
        assert r.vocab is not None and r.durations is not None


# --------------------------------------------------------------------------- lattice dumps
def _lattice_pair(tmp_path, backend, *, dtype=np.float32, blank=-1, durations=(0, 1, 2),
                  shapes=((5, 2), (1, 0), (4, 3), (6, 1)), **kw):
    """A full TDT dump and its lattice dump (written by ``DumpWriter(kind="lattice")`` on
    ``backend``) of the same random logits; returns ``(utts, full path, lattice path)``."""
    utts = _random_utts(list(shapes), V=5, D=len(durations), blank=blank, seed=11,
                        dtype=dtype)
    full = _write(tmp_path / "full.h5", utts, durations=list(durations), blank=blank, **kw)
    lat = _write(tmp_path / "lat.h5", utts, durations=list(durations), blank=blank,
                 kind="lattice", backend=backend, **kw)
    return utts, full, lat


def test_lattice_dump_stores_the_engines_arrays(tmp_path):
    utts, full, lat = _lattice_pair(tmp_path, "cpu")
    from rnntool.tdt_lattice import TDTOptions, load_tdt_engine

    with h5py.File(lat) as f:
        assert f.attrs["dump_kind"] == "lattice" and f.attrs["model_kind"] == "tdt"
        assert f.attrs["durations"].tolist() == [0, 1, 2]
        assert f.attrs["vocab_size"] == 5
        for utt_id, (x, y) in utts.items():
            g = f["utts"][utt_id]
            assert sorted(g) == ["blank_lp", "dur_lp", "emit_lp", "labels"]
            T, U = x.shape[0], y.size
            state = load_tdt_engine("cpu").forward(
                x[None], (y if U else np.zeros(1, np.int64))[None], np.array([T]),
                np.array([U]), TDTOptions(blank=4, durations=(0, 1, 2)), False)
            assert g["blank_lp"].shape == (T, U + 1) and g["emit_lp"].shape == (T, U)
            assert g["dur_lp"].shape == (T, U + 1, 3) and g["dur_lp"].dtype == np.float32
            np.testing.assert_array_equal(g["blank_lp"][()], state.blank_lp[0])
            np.testing.assert_array_equal(g["emit_lp"][()], state.emit_lp[0, :, :U])
            np.testing.assert_array_equal(g["dur_lp"][()], state.dur_lp[0])
            # Each dur_lp row is a distribution over the durations.
            lse = np.logaddexp.reduce(g["dur_lp"][()].astype(np.float64), axis=-1)
            assert np.abs(lse).max() < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lattice_dump_scores_and_aligns_like_its_full_dump(tmp_path, backend, dtype):
    utts, full, lat = _lattice_pair(tmp_path, backend, dtype=dtype)
    rows = {}
    for name, path in (("full", full), ("lat", lat)):
        with DumpReader(path) as r:
            rows[name] = {row["utt_id"]: row for row in score_reader(r, r.utt_ids,
                                                                    backend=backend)}
    for utt_id, (x, y) in utts.items():
        # The same bits: stage 2 on the stored arrays is stage 2 of the logits.
        assert rows["lat"][utt_id]["loss"] == rows["full"][utt_id]["loss"]
        ref = float(tdt_reference_loss(
            torch.from_numpy(x)[None].double(),
            torch.from_numpy(y if y.size else np.zeros(1, np.int64))[None],
            torch.tensor([x.shape[0]]), torch.tensor([y.size]), durations=[0, 1, 2],
            blank=-1)[0])
        assert rows["lat"][utt_id]["loss"] == pytest.approx(
            ref, rel=1e-5 if dtype == np.float32 else 1e-10)
    with DumpReader(full) as rf, DumpReader(lat) as rl:
        for utt_id in utts:
            a = align_utterance(rf, rf.read(utt_id), backend=backend).alignment
            b = align_utterance(rl, rl.read_lattice(utt_id), backend=backend).alignment
            assert a.loss == b.loss and a.best_log_prob == b.best_log_prob
            np.testing.assert_array_equal(a.arcs, b.arcs)
            np.testing.assert_array_equal(a.frames, b.frames)
            np.testing.assert_array_equal(a.token_durations, b.token_durations)
            for field in ("emit_posteriors", "blank_posteriors", "occupancy",
                          "expected_frames"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_compact_command_writes_the_writers_lattice(tmp_path):
    utts, full, lat = _lattice_pair(tmp_path, "cpu", frame_shift=0.04,
                                    vocab=[f"t{v}" for v in range(5)])
    out = tmp_path / "compact.h5"
    result = invoke("compact", full, "-o", out, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    with h5py.File(out) as f, h5py.File(lat) as g:
        assert f.attrs["model_kind"] == "tdt" and f.attrs["durations"].tolist() == [0, 1, 2]
        assert f.attrs["frame_shift"] == 0.04
        for utt_id in utts:
            for name in ("blank_lp", "emit_lp", "dur_lp", "labels"):
                np.testing.assert_array_equal(f["utts"][utt_id][name][()],
                                              g["utts"][utt_id][name][()])
    for cmd, extra in (("score", ()), ("align", ()), ("timestamps", ())):
        a = invoke(cmd, full, "--format", "tsv", *extra)
        b = invoke(cmd, out, "--format", "tsv", *extra)
        assert a.exit_code == b.exit_code == 0, (a.stderr, b.stderr)
        assert a.stdout == b.stdout
    inspected = invoke("inspect", out, "--format", "json")
    assert inspected.exit_code == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    report = report[0] if isinstance(report, list) else report
    assert (report["kind"], report["model_kind"], report["problems"]) == ("lattice", "tdt", 0)


def test_plot_of_a_lattice_dump_draws_the_occupancy_panel_alone(tmp_path):
    _, full, lat = _lattice_pair(tmp_path, "cpu", shapes=((5, 2),))
    for name, path in (("full", full), ("lat", lat)):
        result = invoke("plot", path, "-d", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        assert (tmp_path / name / "u0.png").stat().st_size > 0
    from PIL import Image

    # One panel where the full dump's plot has two: a shorter figure.
    with Image.open(tmp_path / "full" / "u0.png") as a, Image.open(tmp_path / "lat" / "u0.png") as b:
        assert b.size[1] < a.size[1]


def test_lattice_writer_refuses_nan_logits(tmp_path):
    x = np.zeros((3, 2, 5 + 3), np.float32)
    x[1, 0, 6] = np.nan  # a duration logit
    with (pytest.raises(ValueError, match="'u0': NaN or \\+inf in its logits"),
          DumpWriter(tmp_path / "l.h5", model_kind="tdt", durations=[0, 1, 2],
                     kind="lattice") as w):
        w.add("u0", x, np.array([1]))
    assert not list(tmp_path.iterdir())


def _hostile(path, how):
    with h5py.File(path, "a") as f:
        g = f["utts/u0"]
        d = g["dur_lp"][()]
        del g["dur_lp"]
        if how == "shape":
            g["dur_lp"] = d[:, :, :2]
        elif how == "2d":
            g["dur_lp"] = d[:, :, 0]
        elif how == "nan":
            d[2, 1, 1] = np.nan
            g["dur_lp"] = d
        elif how == "posinf":
            d[0, 0, 0] = np.inf
            g["dur_lp"] = d
        elif how == "unnormalised":
            d[3, 0] += 0.5
            g["dur_lp"] = d
        elif how == "all-inf":
            d[1, 2] = -np.inf
            g["dur_lp"] = d
        elif how == "dtype":
            g["dur_lp"] = d.astype(np.float64)
        # "missing": left out


@pytest.mark.parametrize("how, needle", [
    ("shape", "dur_lp has shape (5, 3, 2), but blank_lp (5, 3) and labels (2,) and the 3 "
              "durations make it (T, U+1, D) = (5, 3, 3)"),
    ("2d", "dur_lp must be (T, U+1, D), got shape (5, 3)"),
    ("nan", "dur_lp[t=2, u=1, i=1] = nan"),
    ("posinf", "dur_lp[t=0, u=0, i=0] = inf"),
    ("unnormalised", "dur_lp[t=3, u=0, :] has logsumexp 0.5"),
    ("all-inf", "dur_lp[t=1, u=2, :] has logsumexp -inf"),
    ("dtype", "dur_lp dtype float64 differs from blank_lp's float32"),
    ("missing", "dur_lp"),
])
def test_hostile_lattice_arrays_are_one_line(tmp_path, how, needle):
    _, _, lat = _lattice_pair(tmp_path, "cpu", shapes=((5, 2), (3, 1)),
                              vocab=[f"t{v}" for v in range(5)])
    _hostile(lat, how)
    for cmd in ("score", "align", "timestamps"):
        extra = ("--frame-shift", "0.04", "--word-sep", "t1") if cmd == "timestamps" else ()
        one_line_error(invoke(cmd, lat, "--utt", "u0", *extra), "lat.h5", "u0", needle)
    # The other utterance still reads.
    ok = invoke("score", lat, "--utt", "u1")
    assert ok.exit_code == 0, ok.stderr


# --------------------------------------------------------------------------- grad-check
def _grad_dump(tmp_path, *, dtype=np.float32, durations=(0, 1, 2), spoil=None):
    """A TDT dump whose stored grads are tdt_reference_gradients' (float64, cast to the
    logits' dtype), one entry changed by ``spoil(grads, V)`` when given."""
    utts = _random_utts([(4, 2), (2, 0), (5, 3)], V=5, D=len(durations), blank=-1, seed=7,
                        dtype=dtype)
    path = tmp_path / "g.h5"
    with DumpWriter(path, blank=-1, model_kind="tdt", durations=list(durations)) as w:
        for utt_id, (x, y) in utts.items():
            _, g = tdt_reference_gradients(
                torch.from_numpy(x)[None].double(),
                torch.from_numpy(y if y.size else np.zeros(1, np.int64))[None],
                torch.tensor([x.shape[0]]), torch.tensor([y.size]), durations=list(durations),
                blank=-1)
            g = g[0].numpy().astype(dtype)
            if spoil is not None and utt_id == "u0":
                spoil(g, 5)
            w.add(utt_id, x, y, grads=g)
    return utts, path


def test_grad_check_passes_tdt_dumps_in_rnnt_rows(tmp_path):
    utts, path = _grad_dump(tmp_path)
    result = invoke("grad-check", path, "--format", "tsv", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    rows = rows_of(result.stdout)
    from rnntool.gradcheck import GRADCHECK_FIELDS

    assert list(rows[0]) == GRADCHECK_FIELDS
    for utt_id in utts:
        checks = [r["check"] for r in rows if r["utt_id"] == utt_id]
        # (and CPU against CUDA where CUDA runs: the simulator here, a GPU)
        assert checks[:4] == ["cpu-vs-float64", "float64-vs-finite-diff",
                              "float64-vs-reference", "stored-vs-reference"]
        assert checks[4:] in ([], ["cpu-vs-cuda"])
    assert all(r["result"] == "PASS" for r in rows)


def test_grad_check_covers_the_duration_logits(tmp_path, backend):
    """Every V + D entry is compared: a stored gradient wrong in one duration entry
    fails; the float64 engine agrees with the reference and finite differences at
    duration entries too."""
    from rnntool.gradcheck import (
        check_utterance,
        engine_gradient,
        finite_differences,
        grad_check_utterance,
    )

    def spoil(g, V):
        g[2, 1, V + 1] += 0.01  # a duration entry

    utts, path = _grad_dump(tmp_path, spoil=spoil)
    with DumpReader(path) as r:
        checked = check_utterance(r, r.read("u0", with_grads=True), backend=backend,
                                  compare_cuda=False)
    result = {row["check"]: row["result"] for row in checked.rows}
    assert result == {f"{backend}-vs-float64": "PASS", "float64-vs-finite-diff": "PASS",
                      "float64-vs-reference": "PASS", "stored-vs-reference": "FAIL"}
    bad = next(row for row in checked.rows if row["check"] == "stored-vs-reference")
    assert bad["max_abs_err"] == pytest.approx(0.01, rel=1e-3)
    x, y = utts["u0"]
    x64 = x.astype(np.float64)
    checks = grad_check_utterance(x64, y, blank=-1, backend=backend, samples=8,
                                  durations=(0, 1, 2))
    assert all(c.passed for c in checks)
    ref = next(c for c in checks if c.check == "float64-vs-reference")
    assert ref.n == x.size and ref.worst_ratio < 1e-3  # tokens and durations
    # The engine's float64 gradient at every duration entry against finite differences.
    g = engine_gradient(x64, y, 4, True, backend, durations=(0, 1, 2))
    idx = np.flatnonzero((np.arange(x.size) % x.shape[-1]) >= 5)
    fd = finite_differences(torch.from_numpy(x64.copy())[None], torch.from_numpy(y)[None], idx,
                            blank=4, fused=True, backend=backend, step=1e-4,
                            durations=(0, 1, 2))
    np.testing.assert_allclose(g.reshape(-1)[idx], fd, rtol=1e-6, atol=1e-8)
    assert np.abs(fd).max() > 0.1  # durations carry real gradient here


def test_grad_check_refuses_a_tdt_lattice_dump(tmp_path):
    _, _, lat = _lattice_pair(tmp_path, "cpu", shapes=((3, 1),))
    one_line_error(invoke("grad-check", lat), "lat.h5", "holds no logits")


def test_compact_dump_on_every_backend_scores_like_the_full_dump(tmp_path, backend):
    from rnntool.compact import compact_dump, lattice_writer_for

    utts, full, _ = _lattice_pair(tmp_path, backend)
    out = tmp_path / "c.h5"
    with DumpReader(full) as r:
        with lattice_writer_for(r, out, backend=backend) as w:
            assert compact_dump(r, r.utt_ids, w, backend=backend) == len(utts)
        want = {row["utt_id"]: row["loss"] for row in score_reader(r, r.utt_ids,
                                                                  backend=backend)}
    with DumpReader(out) as r:
        assert (r.model_kind, r.durations) == ("tdt", (0, 1, 2))
        got = {row["utt_id"]: row["loss"] for row in score_reader(r, r.utt_ids,
                                                                 backend=backend)}
    assert got == want
