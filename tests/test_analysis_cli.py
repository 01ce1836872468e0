"""align, plot and grad-check from the command line."""


import h5py
import numpy as np
import pytest
import torch
from helpers import SAMPLE, invoke, one_line_error, random_batch, rows_of

from rnntool import align, rnnt_loss
from rnntool.dump import DumpWriter

needs_sample = pytest.mark.skipif(not SAMPLE.exists(), reason="sample data not built")


@pytest.fixture
def dump(tmp_path):
    x, y, T, U = random_batch(3, 8, 4, 6, seed=41)
    path = tmp_path / "d.h5"
    with DumpWriter(path, vocab=list("_abcde")) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", "b", "c"])
    return path, (x, y, T, U)


def test_align_rows(dump):
    path, (x, y, T, U) = dump
    result = invoke("align", path, "-f", "tsv")
    assert result.exit_code == 0, result.output
    rows = rows_of(result.stdout)
    assert list(rows[0]) == ["utt_id", "position", "token_id", "token", "frame",
                             "expected_frame", "frame_posterior", "loss", "best_log_prob"]
    expected = align(x, y, T, U, blank=0)
    # The utterance's loss and best path's log P on each of its rows (for tsv/json users).
    for r in rows:
        al = expected["abc".index(r["utt_id"])]
        assert float(r["loss"]) == pytest.approx(al.loss, abs=1e-6)
        assert float(r["best_log_prob"]) == pytest.approx(al.best_log_prob, abs=1e-6)
    want = [(u, p, int(y[b, p]), "_abcde"[int(y[b, p])], int(al.frames[p]))
            for b, (u, al) in enumerate(zip("abc", expected, strict=True)) for p in range(al.U)]
    got = [(r["utt_id"], int(r["position"]), int(r["token_id"]), r["token"], int(r["frame"]))
           for r in rows]
    assert got == want
    table = invoke("align", path, "-f", "table", "--utt", "a")
    assert "best path log P" in table.stderr


def test_plot_writes_one_png_per_utterance(dump, tmp_path):
    path, _ = dump
    out = tmp_path / "png"
    result = invoke("plot", path, "--out-dir", out, "-q")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in out.iterdir())
    assert pngs == ["a.png", "b.png", "c.png"]
    assert (out / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_long_utterance(tmp_path):
    x = torch.randn(2000, 4, 5)
    path = tmp_path / "long.h5"
    with DumpWriter(path) as w:
        w.add("long", x, torch.tensor([1, 2, 3]))
    result = invoke("plot", path, "--out-dir", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "long.png").stat().st_size > 10_000


@needs_sample
def test_plot_and_grad_check_on_sample_data(tmp_path):
    result = invoke("plot", SAMPLE, "--out-dir", tmp_path, "--utt", "utt000", "--utt", "utt005")
    assert result.exit_code == 0 and len(list(tmp_path.glob("*.png"))) == 2
    result = invoke("grad-check", SAMPLE, "--utt", "utt000", "--utt", "utt001", "-f", "tsv")
    assert result.exit_code == 0, result.output
    rows = rows_of(result.stdout)
    checks = {(r["utt_id"], r["check"]) for r in rows}
    # utt000 and utt001 carry a trainer's gradient.
    assert ("utt000", "stored-vs-reference") in checks
    assert ("utt001", "float64-vs-finite-diff") in checks
    assert all(r["result"] == "PASS" for r in rows)


def test_grad_check_fails_on_wrong_stored_grads(tmp_path):
    x, y, T, U = random_batch(1, 5, 3, 6, seed=43, mixed=False)
    xx = x.clone().requires_grad_(True)
    from rnntool import rnnt_loss

    rnnt_loss(xx, y, T, U, blank=0, reduction="sum").backward()
    good = tmp_path / "good.h5"
    bad = tmp_path / "bad.h5"
    with DumpWriter(good) as w:
        w.add("u", x[0], y[0], grads=xx.grad[0])
    wrong = xx.grad[0].clone()
    wrong[2, 1] *= 1.5  # e.g. a trainer that scaled part of the gradient
    with DumpWriter(bad) as w:
        w.add("u", x[0], y[0], grads=wrong)
    assert invoke("grad-check", good, "-q").exit_code == 0
    result = invoke("grad-check", bad, "-f", "tsv")
    assert result.exit_code == 1
    rows = {r["check"]: r["result"] for r in rows_of(result.stdout)}
    assert rows["stored-vs-reference"] == "FAIL" and rows["cpu-vs-float64"] == "PASS"
    assert f"{bad}: utterance u: FAIL stored-vs-reference" in result.stderr


def test_analysis_commands_bad_input(tmp_path, dump):
    path, _ = dump
    one_line_error(invoke("align", tmp_path / "nope.h5"), "no such file")
    one_line_error(invoke("plot", path, "--out-dir", tmp_path, "--utt", "zz"), "no utterance 'zz'")
    with h5py.File(path, "r+") as f:
        f["utts/a/labels"][0] = 0
    one_line_error(invoke("grad-check", path), "utterance a: labels[0] = 0 equals blank")
    (tmp_path / "file").write_text("x")
    one_line_error(invoke("plot", path, "--out-dir", tmp_path / "file", "--utt", "b"),
                   "not a directory")


def test_finite_differences_catch_a_wrong_reference(monkeypatch):
    # The finite-difference check is real: break the reference's gradient and it fails.
    import rnntool.gradcheck as gc

    x = np.random.default_rng(0).standard_normal((4, 3, 5))
    labels = np.array([1, 2])
    real = gc.reference_gradients

    def skewed(*a, **k):
        losses, grads = real(*a, **k)
        return losses, grads * 1.01

    monkeypatch.setattr(gc, "reference_gradients", skewed)
    checks = {c.check: c.passed for c in gc.grad_check_utterance(x, labels, blank=0)}
    assert checks["float64-vs-reference"] is False




def test_grad_check_at_real_size_catches_a_planted_error(tmp_path, monkeypatch):
    """T = 200, U = 40, V = 512: the float64 engine and finite differences, not the slow
    reference (which would take minutes), and one wrong entry of a stored gradient is
    still caught; worst_ratio > 1 is what fails the row."""
    import rnntool.gradcheck as gc

    def no_reference(*a, **k):
        raise AssertionError("the slow reference ran at T=200, U=40, V=512")

    monkeypatch.setattr(gc, "reference_gradients", no_reference)
    # (CPU against the CUDA kernels in Numba's simulator would take minutes here.)
    monkeypatch.setattr("rnntool.devices.cuda_usable", lambda: False)
    x, y, T, U = random_batch(1, 200, 40, 512, seed=61, mixed=False)
    xx = x.clone().requires_grad_(True)
    rnnt_loss(xx, y, T, U, blank=0, reduction="sum").backward()
    grads = xx.grad[0].clone()
    grads[100, 20, 7] += 1e-3
    path = tmp_path / "big.h5"
    with DumpWriter(path, blank=0) as w:
        w.add("u", x[0], y[0], grads=grads)
    result = invoke("grad-check", path, "-f", "tsv", "--samples", "6")
    assert result.exit_code == 1, result.output
    rows = {r["check"]: r for r in rows_of(result.stdout)}
    assert rows["cpu-vs-float64"]["result"] == "PASS"
    assert rows["float64-vs-finite-diff"]["result"] == "PASS"
    bad = rows["stored-vs-float64"]
    assert bad["result"] == "FAIL" and float(bad["worst_ratio"]) > 1
    assert "FAIL stored-vs-float64: worst ratio" in result.stderr
    assert "float64-vs-reference" not in rows
