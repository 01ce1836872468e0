"""rnntool.score: rows from dumps equal rnnt_loss on the same data; problems by utterance."""

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import random_batch

from rnntool import rnnt_loss
from rnntool.dump import DumpWriter
from rnntool.reader import DumpReader
from rnntool.score import (
    SCORE_FIELDS,
    STORED_FIELDS,
    input_eps,
    loss_problem,
    score_dumps,
    score_fields,
    score_reader,
    summarize,
    utterance_problem,
)


def write(path, x, y, T, U, ids, **kw):
    input_kind = kw.pop("input_kind", "logits")
    with DumpWriter(path, input_kind=input_kind) as w:
        w.add_batch(x, y, T, U, utt_ids=ids, **kw)
    return path


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("budget", [1, 64 << 20])  # one utterance a batch; all in one
def test_rows_equal_rnnt_loss_bitwise(tmp_path, dtype, budget):
    x, y, T, U = random_batch(5, 7, 3, 6, seed=3, dtype=dtype)
    ids = [f"u{i}" for i in range(5)]
    path = write(tmp_path / "d.h5", x, y, T, U, ids)
    want = rnnt_loss(x, y, T, U, blank=0, reduction="none")
    with DumpReader(path) as r:
        rows = {row["utt_id"]: row for row in score_reader(r, ids, budget_bytes=budget)}
    assert sorted(rows) == ids
    for b, u in enumerate(ids):
        row = rows[u]
        assert (row["T"], row["U"]) == (int(T[b]), int(U[b]))
        assert row["loss"] == float(want[b])  # the same bits as the engine's torch entry point
        assert row["loss_per_frame"] == row["loss"] / int(T[b])
        assert row["loss_per_token"] == row["loss"] / max(int(U[b]), 1)
        assert row["_problem"] is None
        assert "stored_loss" not in row


def test_the_simulated_cuda_backend_scores_the_same(tmp_path):
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("needs the simulator")
    x, y, T, U = random_batch(3, 5, 2, 6, seed=4)
    x[1, 1, 1, 2] = float("nan")  # the engine's own warning must not escape
    ids = ["a", "b", "c"]
    path = write(tmp_path / "d.h5", x, y, T, U, ids)
    with DumpReader(path) as r, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cpu = {row["utt_id"]: row for row in score_reader(r, ids, backend="cpu")}
        sim = {row["utt_id"]: row for row in score_reader(r, ids, backend="cuda")}
    assert [str(w.message) for w in caught] == []
    for u in ("a", "c"):
        assert sim[u]["loss"] == pytest.approx(cpu[u]["loss"], abs=2e-5)
    assert math.isnan(sim["b"]["loss"]) and math.isnan(cpu["b"]["loss"])
    assert sim["b"]["_problem"] == cpu["b"]["_problem"] == "loss is nan (NaN or +inf in its logits)"


def test_score_dumps_keeps_input_order_across_files(tmp_path):
    x, y, T, U = random_batch(4, 6, 3, 5, seed=5)
    a = write(tmp_path / "a.h5", x[:2], y[:2], T[:2], U[:2], ["a0", "a1"],
              losses=torch.tensor([1.0, 2.0]))
    b = write(tmp_path / "b.h5", x[2:], y[2:], T[2:], U[2:], ["b0", "b1"])
    want = rnnt_loss(x, y, T, U, blank=0, reduction="none").tolist()
    seen = []
    with DumpReader(a) as ra, DumpReader(b) as rb:
        rows = score_dumps([(ra, ["a1", "a0"]), (rb, ["b0", "b1"])], budget_bytes=1,
                           on_batch=seen.append)
    assert [r["utt_id"] for r in rows] == ["a1", "a0", "b0", "b1"]  # as asked, not as batched
    assert [r["_file"] for r in rows] == [str(a), str(a), str(b), str(b)]
    assert [r["loss"] for r in rows] == [want[1], want[0], want[2], want[3]]
    assert sum(seen) == 4
    assert rows[0]["stored_loss"] == 2.0 and rows[0]["loss_diff"] == want[1] - 2.0
    assert score_fields(rows) == SCORE_FIELDS + STORED_FIELDS
    assert score_fields(rows[2:]) == SCORE_FIELDS


def test_impossible_losses_are_named_in_the_rows(tmp_path):
    x, y, T, U = random_batch(3, 5, 2, 6, seed=23, mixed=False)
    lp = torch.log_softmax(x, -1)
    lp[1] += 3.0  # rows that sum to e^3: not log-probs, so a negative loss
    path = write(tmp_path / "d.h5", lp, y, T, U, ["a", "b", "c"], input_kind="log_probs")
    with DumpReader(path) as r:
        rows = list(score_reader(r, r.utt_ids))
        info = r.info("b")
        assert input_eps(r, np.float32) == float(np.finfo(np.float32).eps)
        assert utterance_problem(r, info, rows[1]["loss"]) == rows[1]["_problem"]
        assert utterance_problem(r, info, 1.0) is None
    assert rows[1]["loss"] < 0 and "below 0 beyond rounding" in rows[1]["_problem"]
    assert rows[0]["_problem"] is None and rows[2]["_problem"] is None


def test_utterance_problem_follows_loss_problem(tmp_path):
    x, y, T, U = random_batch(1, 5, 2, 6, seed=2, mixed=False)
    path = write(tmp_path / "d.h5", x, y, T, U, ["u"])
    with DumpReader(path) as r:
        info = r.info("u")
        assert input_eps(r, info.dtype) == 0.0  # logits are normalised in the lattice type
        for loss in (math.nan, math.inf, -1e-3, -1e-7, 3.0):
            assert utterance_problem(r, info, loss) == loss_problem(loss, 5, 2)
        # float64: the loss of the float64 reference, checked with float64 rounding.
        assert utterance_problem(r, info, -1e-7, float64=True) == loss_problem(-1e-7, 5, 2, True)


def test_summarize():
    rows = [{"utt_id": u, "loss": v} for u, v in
            [("a", 1.0), ("b", math.nan), ("c", 3.0), ("d", math.inf), ("e", 2.0)]]
    s = summarize(rows, worst=2)
    assert (s["count"], s["finite"], s["total"], s["mean"]) == (5, 3, 6.0, 2.0)
    assert [r["utt_id"] for r in s["worst"]] == ["c", "e"]
    assert s["nonfinite"] == ["b", "d"]
    assert math.isnan(summarize([])["mean"])
