"""rnntool.analysis: inspect's report and align's rows, as the library returns them."""

import math

import h5py
import numpy as np
import pytest
import torch
from helpers import random_batch

from rnntool import align
from rnntool.analysis import ALIGN_FIELDS, DumpReport, align_utterance, inspect_dump
from rnntool.dump import DumpWriter
from rnntool.engine import ImpossibleLossWarning
from rnntool.reader import DumpReader

FACT_KEYS = ["file", "kind", "layout", "blank", "vocab_size", "vocab", "input_kind", "utterances",
             "T_min", "T_max", "U_min", "U_max", "V_min", "V_max", "dtypes", "with_stored_loss",
             "with_grads", "size_bytes", "problems"]


@pytest.fixture
def dump(tmp_path):
    x, y, T, U = random_batch(4, 8, 4, 6, seed=41)
    path = tmp_path / "d.h5"
    with DumpWriter(path, vocab=list("_abcde")) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", "b", "c", "d"], losses=torch.arange(4.0))
    return path, (x, y, T, U)


def test_inspect_dump_facts(dump):
    path, (x, y, T, U) = dump
    with DumpReader(path) as r:
        report = inspect_dump(r)
    assert isinstance(report, DumpReport)
    assert report.problems == []
    assert (report.file, report.layout, report.blank, report.vocab_size) == (str(path), "keyed",
                                                                           0, 6)
    assert report.has_vocab and report.input_kind == "logits" and report.utterances == 4
    t_span, u_span = (int(T.min()), int(T.max())), (int(U.min()), int(U.max()))
    assert (t_span, u_span) == (report.T, report.U)
    assert report.V == (6, 6) and report.dtypes == ["float32"]
    assert report.with_stored_loss == 4 and report.with_grads == 0
    assert report.size_bytes == path.stat().st_size
    facts = report.facts()
    assert list(facts) == FACT_KEYS
    assert (facts["T_min"], facts["T_max"]) == t_span and facts["vocab"] is True
    assert facts["problems"] == 0


def test_inspect_dump_finds_every_problem_in_file_order(tmp_path):
    x, y, T, U = random_batch(4, 5, 2, 6, seed=23, mixed=False)
    x[1, 2, 1, 3] = float("nan")
    x[2] = float("-inf")  # only the blank possible: no alignment emits the labels
    x[2, :, :, 0] = 0.0
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", "b", "c", "d"])
    with h5py.File(path, "r+") as f:
        f["utts/d/labels"][0] = 0  # equals blank: unreadable as an utterance
    with DumpReader(path) as r:
        report = inspect_dump(r)
    assert len(report.problems) == 3
    b, c, d = report.problems
    assert b == f"{path}: utterance b: 1 NaN or +inf logits"
    assert c == f"{path}: utterance c: loss is inf (no alignment has non-zero probability)"
    assert d.startswith(f"{path}: utterance d: labels[0] = 0 equals blank")
    assert report.utterances == 4 and report.facts()["problems"] == 3
    assert report.T == (5, 5)  # over the three readable utterances


def test_inspect_dump_log_probs_that_do_not_normalise(tmp_path):
    x, y, T, U = random_batch(2, 5, 2, 6, seed=7, mixed=False)
    lp = torch.log_softmax(x, -1)
    lp[0] += 3.0
    path = tmp_path / "d.h5"
    with DumpWriter(path, input_kind="log_probs") as w:
        w.add_batch(lp, y, T, U, utt_ids=["a", "b"])
    with DumpReader(path) as r:
        report = inspect_dump(r)
    assert len(report.problems) == 2  # its rows, and the negative loss they give
    assert "log-prob rows do not normalise" in report.problems[0]
    assert "below 0 beyond rounding" in report.problems[1]
    assert all(p.startswith(f"{path}: utterance a: ") for p in report.problems)


@pytest.mark.parametrize("vocab", [True, False])
def test_align_utterance_rows_equal_align(tmp_path, vocab):
    x, y, T, U = random_batch(3, 8, 4, 6, seed=41)
    path = tmp_path / "d.h5"
    with DumpWriter(path, vocab=list("_abcde") if vocab else None) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", "b", "c"])
    expected = align(x, y, T, U, blank=0)
    with DumpReader(path) as r:
        got = [align_utterance(r, r.read(u)) for u in r.utt_ids]
    for b, (a, want) in enumerate(zip(got, expected, strict=True)):
        assert a.utt_id == "abc"[b] and a.problem is None and a.finite
        assert a.loss == want.loss and a.best_log_prob == want.best_log_prob
        assert a.best_path_share == math.exp(want.best_log_prob + want.loss)
        assert 0 < a.best_path_share <= 1
        assert a.grad_norm is None  # not asked for
        rows = a.rows()
        assert len(rows) == want.U and all(list(r) == ALIGN_FIELDS for r in rows)
        for p, row in enumerate(rows):
            tok = int(y[b, p])
            assert (row["utt_id"], row["position"], row["token_id"]) == ("abc"[b], p, tok)
            assert row["token"] == ("_abcde"[tok] if vocab else "")
            assert row["frame"] == int(want.frames[p])
            assert row["expected_frame"] == float(want.expected_frames[p])
            assert row["frame_posterior"] == float(want.frame_posteriors[p])
        np.testing.assert_array_equal(a.alignment.occupancy, want.occupancy)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # align's own
@pytest.mark.parametrize("how", ["nan", "inf"])
def test_align_utterance_of_a_non_finite_loss(tmp_path, how):
    x, y, T, U = random_batch(1, 5, 2, 6, seed=23, mixed=False)
    if how == "nan":
        x[0, 2, 1, 3] = float("nan")
    else:
        x[0] = float("-inf")
        x[0, :, :, 0] = 0.0
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add_batch(x, y, T, U, utt_ids=["u"])
    with DumpReader(path) as r:
        a = align_utterance(r, r.read("u"), grad_norms=True)
    assert not a.finite and a.rows() == [] and a.grad_norm is None
    assert a.problem == {"nan": "loss is nan (NaN or +inf in its logits)",
                         "inf": "loss is inf (no alignment has non-zero probability)"}[how]


def test_align_utterance_of_a_negative_loss_still_has_rows(tmp_path):
    x, y, T, U = random_batch(1, 5, 2, 6, seed=23, mixed=False)
    lp = torch.log_softmax(x, -1) + 3.0
    path = tmp_path / "d.h5"
    with DumpWriter(path, input_kind="log_probs") as w:
        w.add_batch(lp, y, T, U, utt_ids=["u"])
    # The engine's warning passes through (the CLI drops it for an utterance it reports).
    with DumpReader(path) as r, pytest.warns(ImpossibleLossWarning, match="negative") as w:
        a = align_utterance(r, r.read("u"), grad_norms=True)
    assert {x.message.reason for x in w if x.category is ImpossibleLossWarning} == {"negative"}
    assert a.loss < 0 and "below 0 beyond rounding" in a.problem
    assert a.finite and len(a.rows()) == 2 and a.grad_norm is not None
