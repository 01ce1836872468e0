"""Impossible and non-finite results through every command: one line naming file and
utterance, the other utterances still processed, exit 1, and no raw Python warning."""

import json
import warnings

import numpy as np
import pytest
import torch
from helpers import invoke, random_batch, rows_of, run_cli

from rnntool.dump import DumpWriter, log_prob_problem, log_prob_tolerance
from rnntool.score import loss_problem, negative_loss_tolerance

IDS = ["a", "b", "c"]


def broken_dump(path, how, bad="b"):
    """Three utterances; ``bad`` has NaN logits ("nan") or no possible alignment ("inf")."""
    x, y, T, U = random_batch(3, 5, 2, 6, seed=23, mixed=False)
    b = IDS.index(bad)
    if how == "nan":
        x[b, 2, 1, 3] = float("nan")
    else:  # only the blank has non-zero probability: the labels can never be emitted
        x[b] = float("-inf")
        x[b, :, :, 0] = 0.0
    with DumpWriter(path, vocab=list("_abcde")) as w:
        w.add_batch(x, y, T, U, utt_ids=IDS)
    good = path.with_name("good.h5")
    keep = [i for i in range(3) if i != b]
    with DumpWriter(good, vocab=list("_abcde")) as w:
        w.add_batch(x[keep], y[keep], T[keep], U[keep], utt_ids=[IDS[i] for i in keep])
    return path, good


def invoke_quietly(*args):
    """Run the CLI in-process; no warning may escape it (pytest would swallow one)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = invoke(*args)
    assert [str(w.message) for w in caught] == []
    return result


def one_problem_line(result, path, utt_id, *needles):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"rnntool: {path}: utterance {utt_id}: "), lines[0]
    for n in needles:
        assert n in lines[0]
    assert "Warning" not in result.stderr and ".py:" not in result.stderr


WHY = {"nan": "loss is nan (NaN or +inf in its logits)",
       "inf": "loss is inf (no alignment has non-zero probability)"}


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_score(tmp_path, how):
    path, good = broken_dump(tmp_path / "d.h5", how)
    result = invoke_quietly("score", path, "-f", "tsv", "-q")
    one_problem_line(result, path, "b", WHY[how])
    rows = rows_of(result.stdout)
    assert [r["utt_id"] for r in rows] == IDS and rows[1]["loss"] == how  # marked, as computed
    want = rows_of(invoke_quietly("score", good, "-f", "tsv", "-q").stdout)
    assert [rows[0], rows[2]] == want


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_align(tmp_path, how):
    path, good = broken_dump(tmp_path / "d.h5", how)
    result = invoke_quietly("align", path, "-f", "jsonl")
    one_problem_line(result, path, "b", WHY[how])
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert {r["utt_id"] for r in rows} == {"a", "c"}  # no rows for b
    assert rows == [json.loads(line) for line in
                    invoke_quietly("align", good, "-f", "jsonl").stdout.splitlines()]
    assert all(0 <= r["frame_posterior"] <= 1 for r in rows)


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_plot(tmp_path, how):
    path, _ = broken_dump(tmp_path / "d.h5", how)
    out = tmp_path / "png"
    result = invoke_quietly("plot", path, "--out-dir", out, "-q")
    one_problem_line(result, path, "b", WHY[how])
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]  # no PNG for b


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_grad_check(tmp_path, how):
    path, good = broken_dump(tmp_path / "d.h5", how)
    result = invoke_quietly("grad-check", path, "-f", "tsv", "-q", "--samples", "4")
    one_problem_line(result, path, "b", WHY[how])
    rows = rows_of(result.stdout)
    assert {r["utt_id"] for r in rows} == {"a", "c"} and all(r["result"] == "PASS" for r in rows)
    assert rows == rows_of(invoke_quietly("grad-check", good, "-f", "tsv", "-q",
                                      "--samples", "4").stdout)


@pytest.mark.parametrize("how", ["nan", "inf"])
def test_inspect(tmp_path, how):
    path, _ = broken_dump(tmp_path / "d.h5", how)
    result = invoke_quietly("inspect", path)
    one_problem_line(result, path, "b", "1 NaN or +inf logits" if how == "nan" else WHY[how])
    assert rows_of(result.stdout)[0]["utterances"] == "3"


def test_plot_as_a_real_process_prints_no_raw_warning(tmp_path):
    # In-process runs cannot see what Python's own warning printer would write.
    path, _ = broken_dump(tmp_path / "d.h5", "nan")
    out = run_cli("plot", path, "--out-dir", tmp_path / "png", "-q")
    assert out.returncode == 1
    assert out.stderr.splitlines() == [f"rnntool: {path}: utterance b: {WHY['nan']}"]


def test_other_warnings_become_one_line_naming_the_utterance(tmp_path, monkeypatch):
    import rnntool.plots as plots

    real = plots.plot_utterance

    def noisy(path, **kw):
        warnings.warn("Glyph 9601 missing from font(s) DejaVu Sans.\n  more", UserWarning,
                      stacklevel=1)
        warnings.warn("Glyph 9601 missing from font(s) DejaVu Sans.\n  more", UserWarning,
                      stacklevel=1)
        real(path, **kw)

    monkeypatch.setattr(plots, "plot_utterance", noisy)
    x, y, T, U = random_batch(1, 4, 2, 5, seed=2, mixed=False)
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add_batch(x, y, T, U, utt_ids=["u"])
    result = invoke_quietly("plot", path, "--out-dir", tmp_path / "png", "-q")
    assert result.exit_code == 0  # a note, not a problem
    assert result.stderr.splitlines() == [
        f"rnntool: {path}: utterance u: warning: Glyph 9601 missing from font(s) DejaVu Sans."]


# --------------------------------------------------------------------------- impossible values
def logp_dump(path, shift_b=0.0, dtype=torch.float32, V=6):
    x, y, T, U = random_batch(3, 5, 2, V, seed=23, mixed=False)
    lp = torch.log_softmax(x, -1).to(dtype)
    lp[1] += shift_b
    with DumpWriter(path, input_kind="log_probs") as w:
        w.add_batch(lp, y, T, U, utt_ids=IDS)
    return path


def test_negative_loss_is_caught_by_score_and_align(tmp_path):
    path = logp_dump(tmp_path / "d.h5", shift_b=3.0)  # b's rows sum to e^3: not log-probs
    result = invoke_quietly("score", path, "-f", "tsv", "-q")
    one_problem_line(result, path, "b", "below 0 beyond rounding", "normalised")
    rows = rows_of(result.stdout)
    assert float(rows[1]["loss"]) < 0 and all(float(r["loss"]) > 0 for r in (rows[0], rows[2]))
    result = invoke_quietly("align", path, "-f", "tsv")
    one_problem_line(result, path, "b", "below 0 beyond rounding")
    assert {r["utt_id"] for r in rows_of(result.stdout)} == set(IDS)  # still aligned


def test_inspect_finds_log_probs_that_do_not_normalise(tmp_path):
    path = logp_dump(tmp_path / "d.h5", shift_b=3.0)
    result = invoke_quietly("inspect", path)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    # b: its rows, and the negative loss they give; nothing about a or c.
    assert len(lines) == 2 and all(f"{path}: utterance b: " in ln for ln in lines)
    assert "15 of 15 log-prob rows do not normalise" in lines[0]
    # A shift far inside float16's rounding is not a problem; one just outside it is.
    tol16 = log_prob_tolerance(np.finfo(np.float16).eps, 6)
    ok = invoke_quietly("inspect", logp_dump(tmp_path / "ok.h5", dtype=torch.float16))
    assert ok.exit_code == 0, ok.stderr
    x = torch.log_softmax(torch.randn(4, 3, 6, dtype=torch.float64), -1)
    assert log_prob_problem((x + tol16 * 0.5).numpy().astype(np.float16)) is None
    assert "do not normalise" in log_prob_problem((x + tol16 * 2).numpy().astype(np.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_real_log_softmax_output_passes(tmp_path, dtype):
    # bfloat16 is stored as float32: the check follows the precision the values carry.
    path = tmp_path / "d.h5"
    x, y, T, U = random_batch(2, 30, 8, 512, seed=5, scale=4.0)
    with DumpWriter(path, input_kind="log_probs") as w:
        w.add_batch(torch.log_softmax(x.to(dtype), -1), y, T, U)
        w.add_batch(torch.log_softmax(x, -1).to(dtype), y, T, U)  # rounded after
    result = invoke_quietly("inspect", path)
    assert result.exit_code == 0, result.stderr


def test_logits_dumps_are_not_checked_for_normalisation(tmp_path):
    x, y, T, U = random_batch(2, 4, 2, 5, seed=6)
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add_batch(x + 10, y, T, U)
    assert invoke_quietly("inspect", path).exit_code == 0


def test_negative_loss_tolerance():
    # A float32 loss of -1e-7 is rounding; -1e-3 is not.
    assert negative_loss_tolerance(1, 0) == 1e-6  # the floor
    assert negative_loss_tolerance(2000, 300) == pytest.approx(8 * 2.0**-23 * 2300)
    assert loss_problem(-1e-7, 5, 2) is None and loss_problem(0.0, 1, 0) is None
    assert "below 0 beyond rounding" in loss_problem(-1e-3, 5, 2)
    assert loss_problem(12.5, 5, 2) is None
    assert loss_problem(-1e-7, 5, 2, float64=True) is None
