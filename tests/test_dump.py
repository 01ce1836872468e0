"""The HDF5 dump format: writer -> reader round trips, both layouts, validation."""

import os
import re

import h5py
import numpy as np
import pytest
import torch
from helpers import BAD_DUMPS, bad_dump, random_batch, write_padded

from rnntool.dump import DumpError, DumpReader, DumpWriter


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("compression", [None, "lzf", "gzip"])
def test_keyed_round_trip(tmp_path, dtype, compression):
    x, y, T, U = random_batch(4, 7, 3, 6, seed=2)
    x = x.numpy().astype(dtype)
    path = tmp_path / "d.h5"
    with DumpWriter(path, blank=0, vocab=list("_abcde"), compression=compression) as w:
        ids = w.add_batch(x, y, T, U, utt_ids=["a", "b", "c", "d"], losses=[1.0, 2.0, 3.0, 4.0],
                          texts=["x", "y", "z", "w"])
    assert ids == ["a", "b", "c", "d"]
    with DumpReader(path) as r:
        assert r.layout == "keyed" and r.blank == 0 and r.vocab_size == 6
        assert r.vocab == list("_abcde") and r.input_kind == "logits"
        assert sorted(r.utt_ids) == ids
        for b, u in enumerate(ids):
            utt = r.read(u)
            T_b, U_b = int(T[b]), int(U[b])
            assert utt.logits.dtype == dtype
            np.testing.assert_array_equal(utt.logits, x[b, :T_b, : U_b + 1])
            np.testing.assert_array_equal(utt.labels, y[b, :U_b].numpy())
            assert utt.info.attrs["loss"] == float(b + 1)
            assert utt.info.attrs["text"] == "xyzw"[b]
        if compression:
            assert r._f["utts/a/logits"].compression == compression


def test_add_single_with_grads_and_torch_input(tmp_path):
    x = torch.randn(5, 3, 4, dtype=torch.bfloat16)
    g = torch.randn(5, 3, 4)
    with DumpWriter(tmp_path / "d.h5", blank=-1) as w:
        w.add("utt-1", x, torch.tensor([0, 2]), grads=g, text="hi")
    with DumpReader(tmp_path / "d.h5") as r:
        utt = r.read("utt-1", with_grads=True)
        assert utt.logits.dtype == np.float32  # HDF5 has no bfloat16
        np.testing.assert_array_equal(utt.grads, g.numpy())
        assert r.blank == -1


def test_writer_rejects_bad_utterances(tmp_path):
    with DumpWriter(tmp_path / "d.h5") as w:
        with pytest.raises(ValueError, match="contains '/'"):
            w.add("a/b", np.zeros((2, 2, 3), np.float32), [1])
        with pytest.raises(ValueError, match="labels\\[0\\] = 0 is out of range or blank"):
            w.add("a", np.zeros((2, 2, 3), np.float32), [0])
        with pytest.raises(ValueError, match="2 labels but logits have U\\+1 = 2"):
            w.add("a", np.zeros((2, 2, 3), np.float32), [1, 2])
        w.add("a", np.zeros((2, 2, 3), np.float32), [1])
        with pytest.raises(ValueError, match="already added"):
            w.add("a", np.zeros((2, 2, 3), np.float32), [1])
        with pytest.raises(ValueError, match="V = 4, the dump's vocab size is 3"):
            w.add("b", np.zeros((2, 2, 4), np.float32), [1])


def test_writer_leaves_no_file_when_interrupted(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(KeyboardInterrupt), DumpWriter(path) as w:
        w.add("a", np.zeros((2, 2, 3), np.float32), [1])
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_padded_layout(tmp_path, dtype):
    x, y, T, U = random_batch(3, 6, 4, 5, seed=4)
    path = tmp_path / "p.h5"
    write_padded(path, x.numpy().astype(dtype), y.clamp(min=0).numpy(), T.numpy(), U.numpy(),
                 blank=0)
    with DumpReader(path) as r:
        assert r.layout == "padded" and r.utt_ids == ["0", "1", "2"] and r.vocab_size == 5
        for b in range(3):
            utt = r.read(str(b))
            assert utt.logits.shape == (int(T[b]), int(U[b]) + 1, 5)
            np.testing.assert_array_equal(utt.logits, x[b, : int(T[b]), : int(U[b]) + 1].numpy()
                                          .astype(dtype))
    write_padded(path, x.numpy(), y.clamp(min=0).numpy(), T.numpy(), U.numpy(),
                 utt_ids=["x", "y", "z"])
    with DumpReader(path) as r:
        assert r.utt_ids == ["x", "y", "z"] and r.read("z").labels.shape == (int(U[2]),)


def test_batches_sorted_and_within_budget(tmp_path):
    x, y, T, U = random_batch(9, 10, 4, 5, seed=6)
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add_batch(x, y, T, U)
    with DumpReader(path) as r:
        budget = 3 * 10 * 5 * 5 * 4
        groups = list(r.batches(r.utt_ids, budget))
        assert sorted(i.utt_id for g in groups for i, _ in g) == sorted(r.utt_ids)
        sizes = [i.T * (i.U + 1) for g in groups for i, _ in g]
        assert sizes == sorted(sizes)
        for g in groups:
            infos = [i for i, _ in g]
            padded = len(infos) * max(i.T for i in infos) * (max(i.U for i in infos) + 1) * 20
            assert len(g) == 1 or padded <= budget


@pytest.mark.parametrize("how, message", BAD_DUMPS)
def test_reader_names_file_and_utterance(tmp_path, how, message):
    path = bad_dump(tmp_path / "d.h5", how)
    with DumpReader(path) as r, pytest.raises(DumpError, match=re.escape(f"{path}: {message}")):
        list(r.batches(r.utt_ids, 1 << 20))


def test_reader_file_errors(tmp_path):
    with pytest.raises(DumpError, match="no such file"):
        DumpReader(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DumpError, match="not a readable HDF5 file"):
        DumpReader(tmp_path / "text.h5")
    with h5py.File(tmp_path / "empty.h5", "w"):
        pass
    with pytest.raises(DumpError, match="neither layout"):
        DumpReader(tmp_path / "empty.h5")
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        w.add("u0", np.random.rand(50, 20, 30).astype(np.float32), np.arange(1, 20))
    data = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(DumpError, match="trunc.h5"), DumpReader(tmp_path / "trunc.h5") as r:
        list(r.batches(r.utt_ids, 1 << 30))
        r.read("u0")


def test_padded_lengths_beyond_dims(tmp_path):
    x, y, T, U = random_batch(2, 4, 2, 5, seed=8, mixed=False)
    path = tmp_path / "p.h5"
    T[1] = 7
    write_padded(path, x.numpy(), y.numpy(), T.numpy(), U.numpy())
    with DumpReader(path) as r, pytest.raises(DumpError, match=r"utterance 1: logit_lengths\[1\] = 7"):
        r.info("1")
