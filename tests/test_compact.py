"""compact_dump: a full dump (keyed or padded) into a lattice dump, streaming, equal bit for
bit to DumpWriter(kind="lattice") of the same logits."""

import os

import numpy as np
import pytest
import torch
from helpers import (
    SMALL_LAUNCHES,
    random_batch,
    read_lattice_dump,
    write_keyed_raw,
    write_padded,
)

from rnntool.compact import compact_dump, lattice_writer_for
from rnntool.dump import DumpError, DumpWriter
from rnntool.reader import DumpReader

V = 6
IDS = ["a", "b", "c", "d", "e"]


def logits_of(dtype, input_kind="logits", seed=0, B=5, T=7, U=3):
    x, y, t_len, u_len = random_batch(B, T, U, V, seed=seed, scale=2.0)
    if input_kind == "log_probs":
        x = torch.log_softmax(x.double(), -1)
    return x.numpy().astype(dtype), y.numpy(), t_len.numpy(), u_len.numpy()


def full_dump(path, x, y, t_len, u_len, *, blank=0, input_kind="logits", attrs=True):
    with DumpWriter(path, blank=blank, vocab=[f"t{v}" for v in range(V)],
                    input_kind=input_kind) as w:
        w.add_batch(x, y, t_len, u_len, utt_ids=IDS,
                    losses=[1.5, None, 2.5, 0.25, 4.0] if attrs else None,
                    texts=["one", "two", None, "four", "five"] if attrs else None)


def direct_lattice(path, x, y, t_len, u_len, ids=IDS, **kw):
    """What DumpWriter(kind="lattice") writes for the same logits (the utterances of
    ``ids``)."""
    keep = [IDS.index(u) for u in ids]
    with DumpWriter(path, kind="lattice", **kw) as w:
        w.add_batch(x[keep], y[keep], t_len[keep], u_len[keep], utt_ids=ids)
    return read_lattice_dump(path)


def compacted(src, out, ids=None, writer_kw=None, **kw):
    with DumpReader(src) as r, lattice_writer_for(r, out, **(writer_kw or {})) as w:
        n = compact_dump(r, r.utt_ids if ids is None else ids, w, **kw)
    return n, read_lattice_dump(out)


def assert_same(got, want):
    (root_g, utts_g), (root_w, utts_w) = got, want
    assert root_g == root_w
    assert sorted(utts_g) == sorted(utts_w)
    for u, arrays in utts_w.items():
        assert utts_g[u]["attrs"] == arrays["attrs"], u
        for name, a in arrays.items():
            if name != "attrs":
                b = utts_g[u][name]
                assert (b.dtype, b.shape) == (a.dtype, a.shape), (u, name)
                assert b.tobytes() == a.tobytes(), (u, name)


# --------------------------------------------------------------------------- equal bits
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("input_kind, blank", [("logits", 0), ("log_probs", -1), ("logits", 2)])
def test_keyed_dump_compacts_to_the_writers_lattice(tmp_path, dtype, input_kind, blank):
    x, y, t_len, u_len = logits_of(dtype, input_kind)
    y = np.where(y == blank % V, (blank % V + 1) % V, y)  # no label is the blank
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len, blank=blank, input_kind=input_kind)
    n, got = compacted(tmp_path / "full.h5", tmp_path / "lat.h5")
    assert n == len(IDS)
    with DumpWriter(tmp_path / "want.h5", kind="lattice", blank=blank % V,
                    vocab=[f"t{v}" for v in range(V)], input_kind=input_kind) as w:
        w.add_batch(x, y, t_len, u_len, utt_ids=IDS, losses=[1.5, None, 2.5, 0.25, 4.0],
                    texts=["one", "two", None, "four", "five"])
    want = read_lattice_dump(tmp_path / "want.h5")
    assert_same(got, want)
    root, utts = got
    assert (root["blank"], root["input_kind"], root["vocab_size"]) == (blank % V, input_kind, V)
    assert utts["a"]["attrs"] == {"loss": 1.5, "text": "one"}
    assert utts["b"]["attrs"] == {"text": "two"} and utts["c"]["attrs"] == {"loss": 2.5}
    lattice = np.float64 if dtype == np.float64 else np.float32
    assert utts["a"]["blank_lp"].dtype == lattice


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_padded_dump_compacts_to_the_writers_lattice(tmp_path, dtype):
    x, y, t_len, u_len = logits_of(dtype, seed=1)
    write_padded(tmp_path / "full.h5", x, np.maximum(y, 0), t_len, u_len, utt_ids=IDS,
                 blank=0)
    n, got = compacted(tmp_path / "full.h5", tmp_path / "lat.h5")
    assert n == len(IDS)
    assert_same(got, direct_lattice(tmp_path / "want.h5", x, np.maximum(y, 0), t_len, u_len))


def test_a_keyed_dump_without_vocab_size_takes_v_from_its_utterances(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32, seed=2)
    y = np.where(y == V - 1, 1, y)  # blank = -1 is V - 1
    write_keyed_raw(tmp_path / "full.h5",
                    {u: (x[b, : t_len[b], : u_len[b] + 1], y[b, : u_len[b]])
                     for b, u in enumerate(IDS)}, blank=-1)
    with DumpReader(tmp_path / "full.h5") as r:
        assert (r.vocab_size, r.blank) == (-1, -1)
    _, got = compacted(tmp_path / "full.h5", tmp_path / "lat.h5")
    assert_same(got, direct_lattice(tmp_path / "want.h5", x, y, t_len, u_len, blank=V - 1))


def test_subset_selection(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32, seed=3)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len, attrs=False)
    n, got = compacted(tmp_path / "full.h5", tmp_path / "lat.h5", ids=["d", "b"])
    assert n == 2
    assert_same(got, direct_lattice(tmp_path / "want.h5", x, y, t_len, u_len, ids=["d", "b"],
                                    vocab=[f"t{v}" for v in range(V)]))


def test_a_small_budget_gives_the_same_file_in_many_batches(tmp_path):
    x, y, t_len, u_len = logits_of(np.float16, seed=4)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    batches = []
    n, one = compacted(tmp_path / "full.h5", tmp_path / "one.h5", on_batch=batches.append)
    assert n == 5 and batches == [5]
    batches.clear()
    n, many = compacted(tmp_path / "full.h5", tmp_path / "many.h5", budget_bytes=1,
                        on_batch=batches.append)
    assert n == 5 and batches == [1] * 5
    assert_same(many, one)


def test_an_empty_selection_writes_an_empty_lattice_dump(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    n, (root, utts) = compacted(tmp_path / "full.h5", tmp_path / "lat.h5", ids=[])
    assert n == 0 and utts == {} and root["vocab_size"] == V
    with DumpReader(tmp_path / "lat.h5") as r:
        assert (r.kind, len(r)) == ("lattice", 0)


# --------------------------------------------------------------------------- refusals
def test_a_lattice_dump_is_refused(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32)
    direct_lattice(tmp_path / "lat.h5", x, y, t_len, u_len)
    with DumpReader(tmp_path / "lat.h5") as r:
        with pytest.raises(DumpError, match="lat.h5: already a lattice dump"):
            lattice_writer_for(r, tmp_path / "out.h5")
        with DumpWriter(tmp_path / "out.h5", kind="lattice", vocab_size=V) as w, \
                pytest.raises(DumpError, match="lat.h5: already a lattice dump"):
            compact_dump(r, r.utt_ids, w)
    assert sorted(os.listdir(tmp_path)) == ["lat.h5", "out.h5"]


@pytest.mark.parametrize("kw, match", [
    ({"kind": "full"}, "DumpWriter\\(kind='lattice'\\)"),
    ({"kind": "lattice", "blank": 3}, "the writer's blank 3 is not the dump's 0"),
    ({"kind": "lattice", "input_kind": "log_probs"}, "input_kind 'log_probs'"),
    ({"kind": "lattice", "vocab_size": V + 1}, f"vocabulary size is {V + 1}, the dump's {V}"),
])
def test_a_writer_that_does_not_match_is_refused(tmp_path, kw, match):
    x, y, t_len, u_len = logits_of(np.float32)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    with DumpReader(tmp_path / "full.h5") as r:
        w = DumpWriter(tmp_path / "out.h5", **kw)
        with pytest.raises(ValueError, match=match):
            compact_dump(r, r.utt_ids, w)
        w.abort()
    assert os.listdir(tmp_path) == ["full.h5"]


def test_a_bad_utterance_is_refused_before_anything_is_read(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    import h5py

    with h5py.File(tmp_path / "full.h5", "r+") as f:
        f["utts/e/labels"][0] = 99
    with (DumpReader(tmp_path / "full.h5") as r,
          pytest.raises(DumpError, match="utterance e: labels\\[0\\] = 99"),
          lattice_writer_for(r, tmp_path / "lat.h5") as w):
        compact_dump(r, r.utt_ids, w, on_batch=pytest.fail)
    assert os.listdir(tmp_path) == ["full.h5"]


def test_nan_logits_are_refused_naming_the_utterance(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32)
    x[3, 0, 0, 1] = np.nan
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    with (DumpReader(tmp_path / "full.h5") as r,
          pytest.raises(ValueError, match="utterance 'd': NaN or \\+inf in its logits"),
          lattice_writer_for(r, tmp_path / "lat.h5") as w):
        compact_dump(r, r.utt_ids, w)
    assert os.listdir(tmp_path) == ["full.h5"]


def test_interrupted_mid_way_leaves_no_file(tmp_path):
    x, y, t_len, u_len = logits_of(np.float32)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    out = tmp_path / "out"
    out.mkdir()
    calls = []

    def stop(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with (DumpReader(tmp_path / "full.h5") as r, pytest.raises(KeyboardInterrupt),
          lattice_writer_for(r, out / "lat.h5") as w):
        compact_dump(r, r.utt_ids, w, budget_bytes=1, on_batch=stop)
    assert calls == [1, 1]
    assert os.listdir(out) == []  # neither the dump nor its .part file


# --------------------------------------------------------------------------- the CUDA engine
def test_simulated_cuda_backend(tmp_path):
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("runs the CUDA kernels in Numba's simulator")
    x, y, t_len, u_len = logits_of(np.float32, B=5, T=4, U=2)
    full_dump(tmp_path / "full.h5", x, y, t_len, u_len)
    _, (root_c, cpu) = compacted(tmp_path / "full.h5", tmp_path / "cpu.h5")
    with cuda.config(**SMALL_LAUNCHES):
        n, (root_g, gpu) = compacted(tmp_path / "full.h5", tmp_path / "cuda.h5",
                                     writer_kw={"backend": "cuda"}, backend="cuda",
                                     budget_bytes=200)
    assert n == 5 and root_g == root_c and sorted(gpu) == sorted(cpu)
    for u in cpu:
        assert gpu[u]["attrs"] == cpu[u]["attrs"]
        np.testing.assert_array_equal(gpu[u]["labels"], cpu[u]["labels"])
        for name in ("blank_lp", "emit_lp", "log_p2_others"):
            assert gpu[u][name].dtype == cpu[u][name].dtype
            np.testing.assert_allclose(gpu[u][name], cpu[u][name], rtol=1e-6, atol=1e-6)
    # A writer that would run the CPU engine on what compact_dump(backend="cuda") hands it.
    with (DumpReader(tmp_path / "full.h5") as r, lattice_writer_for(r, tmp_path / "x.h5") as w,
          pytest.raises(ValueError, match="make it with backend='cuda'")):
        compact_dump(r, r.utt_ids, w, backend="cuda")
