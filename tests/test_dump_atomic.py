"""DumpWriter.add / add_batch are all-or-nothing, and take tensors that require grad,
tensors on any device, and numpy / 0-d scalars wherever they take numbers."""

import h5py
import numpy as np
import pytest
import torch
from helpers import random_batch

from rnntool.dump import DumpReader, DumpWriter

GOOD_X = np.zeros((3, 3, 5), np.float32)
GOOD_Y = np.array([1, 2])

# (what is wrong, the keyword arguments to add that are wrong)
BAD_ADD = [
    ("logits dims", {"logits": np.zeros((3, 5), np.float32)}),
    ("logits dtype", {"logits": np.zeros((3, 3, 5), np.int32)}),
    ("labels count", {"labels": np.array([1])}),
    ("labels float", {"labels": np.array([1.0, 2.0])}),
    ("label = blank", {"labels": np.array([0, 2])}),
    ("label >= V", {"labels": np.array([1, 9])}),
    ("grads shape", {"grads": np.zeros((3, 3, 4), np.float32)}),
    ("grads dtype", {"grads": np.zeros((3, 3, 5), np.int64)}),
    ("loss not a number", {"loss": "low"}),
    ("loss a vector", {"loss": np.array([1.0, 2.0])}),
    ("text not a str", {"text": 3}),
    ("attr of objects", {"note": np.array([object()])}),
    ("V differs", {"logits": np.zeros((3, 3, 6), np.float32), "first_v": 5}),
]


def _add_args(kw):
    kw = dict(kw)
    kw.pop("first_v", None)
    return kw.pop("logits", GOOD_X), kw.pop("labels", GOOD_Y), kw


@pytest.mark.parametrize("what, bad", BAD_ADD, ids=[b[0] for b in BAD_ADD])
def test_bad_add_leaves_nothing_and_a_retry_succeeds(tmp_path, what, bad):
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        if "first_v" in bad:
            w.add("first", GOOD_X, GOOD_Y)
        x, y, kw = _add_args(bad)
        with pytest.raises((ValueError, TypeError)):
            w.add("u1", x, y, **kw)
        assert "u1" not in w._utts
        w.add("u1", GOOD_X, GOOD_Y, loss=1.5, text="ok")  # the retry
    with DumpReader(path) as r:
        assert "u1" in r.utt_ids and r.info("u1").attrs == {"loss": 1.5, "text": "ok"}


def test_loss_tensor_that_requires_grad(tmp_path):
    # The example: loss[0] of a loss that requires grad.
    x, y, T, U = random_batch(2, 4, 2, 5, seed=1, mixed=False)
    xg = x.clone().requires_grad_(True)
    from rnntool import rnnt_loss

    loss = rnnt_loss(xg, y, T, U, blank=0, reduction="none")
    assert loss.requires_grad
    want = loss.detach()
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add("u1", xg[0], y[0], loss=loss[0], grads=xg[0] * 0)
        w.add_batch(xg, y, T, U, utt_ids=["b0", "b1"], losses=loss, grads=xg * 0)
    with DumpReader(path) as r:
        assert r.info("u1").attrs["loss"] == pytest.approx(float(want[0]))
        assert [r.info(u).attrs["loss"] for u in ("b0", "b1")] == pytest.approx(want.tolist())
        np.testing.assert_array_equal(r.read("b1").logits, x[1].numpy())


@pytest.mark.parametrize("kind", ["numpy", "0-d array", "0-d tensor", "tensor (1,)"])
def test_numpy_and_0d_scalars_accepted(tmp_path, kind):
    conv = {
        "numpy": lambda v, t: (np.int32 if t is int else np.float32)(v),
        "0-d array": lambda v, t: np.array(v, np.int64 if t is int else np.float64),
        "0-d tensor": lambda v, t: torch.tensor(v),
        "tensor (1,)": lambda v, t: torch.tensor([v]),
    }[kind]
    path = tmp_path / "d.h5"
    with DumpWriter(path, blank=conv(-1, int)) as w:
        w.add("u", torch.zeros(3, 3, 5), torch.tensor([1, 2]), loss=conv(2.5, float))
        w.add_batch(torch.zeros(2, 3, 3, 5), torch.tensor([[1, 2], [3, 1]]),
                    [conv(3, int), conv(2, int)], [conv(2, int), conv(1, int)],
                    utt_ids=["a", "b"], losses=[conv(1.0, float), conv(2.0, float)])
    with DumpReader(path) as r:
        assert r.blank == -1 and isinstance(r.blank, int)
        assert r.info("u").attrs["loss"] == 2.5
        assert r.info("b").attrs["loss"] == 2.0 and (r.info("b").T, r.info("b").U) == (2, 1)


def test_blank_rejects_non_integers(tmp_path):
    for bad in (1.0, True, np.array([0, 1]), "0"):
        with pytest.raises(TypeError, match="blank must be an int"):
            DumpWriter(tmp_path / "d.h5", blank=bad)


BAD_BATCH = [  # (what is wrong, keyword overrides for add_batch)
    ("lengths too long", {"logit_lengths": torch.tensor([4, 9])}),
    ("float lengths", {"label_lengths": torch.tensor([2.0, 1.0])}),
    ("losses shape", {"losses": torch.tensor([1.0, 2.0, 3.0])}),
    ("losses not numbers", {"losses": np.array(["a", "b"])}),
    ("texts count", {"texts": ["only one"]}),
    ("text not a str", {"texts": ["x", 7]}),
    ("grads shape", {"grads": torch.zeros(2, 4, 3, 4)}),
    ("duplicate ids", {"utt_ids": ["a", "a"]}),
    ("id with /", {"utt_ids": ["a", "b/c"]}),
    ("id already in file", {"utt_ids": ["old", "b"]}),
    ("second label is blank", {"labels": torch.tensor([[1, 2], [0, 1]])}),
]


@pytest.mark.parametrize("what, bad", BAD_BATCH, ids=[b[0] for b in BAD_BATCH])
def test_bad_add_batch_writes_nothing_and_a_retry_succeeds(tmp_path, what, bad):
    x = torch.randn(2, 4, 3, 5)
    good = {"logits": x, "labels": torch.tensor([[1, 2], [3, 1]]),
            "logit_lengths": torch.tensor([4, 3]), "label_lengths": torch.tensor([2, 1]),
            "utt_ids": ["a", "b"], "losses": torch.tensor([1.0, 2.0]), "texts": ["x", "y"]}
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add("old", torch.zeros(2, 1, 5), [])
        with pytest.raises((ValueError, TypeError)):
            w.add_batch(**{**good, **bad})
        assert sorted(w._utts) == ["old"]
        assert w.add_batch(**good) == ["a", "b"]
    with DumpReader(path) as r:
        assert sorted(r.utt_ids) == ["a", "b", "old"]
        assert r.info("b").attrs == {"loss": 2.0, "text": "y"}


def test_failure_while_writing_rolls_back(tmp_path, monkeypatch):
    # A failure inside HDF5 (disk full, say) after some datasets exist: nothing stays.
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        real = w._dataset
        calls = []

        def flaky(group, name, data):
            calls.append(name)
            if len(calls) == 3:
                raise OSError("disk full")
            real(group, name, data)

        monkeypatch.setattr(w, "_dataset", flaky)
        with pytest.raises(OSError, match="disk full"):
            w.add_batch(torch.zeros(2, 3, 3, 5), torch.tensor([[1, 2], [3, 1]]), [3, 3], [2, 2],
                        utt_ids=["a", "b"], grads=torch.zeros(2, 3, 3, 5))
        assert list(w._utts) == []
        monkeypatch.setattr(w, "_dataset", real)
        w.add_batch(torch.zeros(2, 3, 3, 5), torch.tensor([[1, 2], [3, 1]]), [3, 3], [2, 2],
                    utt_ids=["a", "b"])
    with h5py.File(path) as f:
        assert sorted(f["utts"]) == ["a", "b"] and "grads" not in f["utts/a"]


def test_vocab_size_fixed_only_by_a_written_utterance(tmp_path):
    with DumpWriter(tmp_path / "d.h5") as w:
        with pytest.raises(ValueError):
            w.add("u", np.zeros((2, 2, 7), np.float32), [0])  # label = blank: rejected
        w.add("u", np.zeros((2, 2, 5), np.float32), [1])  # V = 5 is fine: 7 never took
        assert w.vocab_size == 5
