"""DumpReader on lattice dumps (dump_kind="lattice"): round trips, and every way such a
file can be wrong is one DumpError line naming the file (and the utterance)."""

import h5py
import numpy as np
import pytest
from helpers import write_keyed_raw, write_lattice_raw, write_padded_raw

from rnntool.dump import LATTICE_DATASETS, DumpError, DumpWriter
from rnntool.reader import DumpReader, LatticeUtterance, UttInfo, group_by_budget, padded_bytes

V = 5


def lattice_of(logits: np.ndarray, labels, blank: int = 0, dtype=np.float32) -> dict:
    """The lattice datasets of ``(T, U+1, V)`` logits, computed in float64."""
    x = np.asarray(logits, np.float64)
    lp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - x.max(-1, keepdims=True)
    T, U1, _ = x.shape
    y = np.asarray(labels, np.int64)
    blank_lp = lp[..., blank]
    emit_lp = np.stack([lp[:, u, y[u]] for u in range(U1 - 1)], axis=1) if U1 > 1 \
        else np.zeros((T, 0))
    p2 = np.exp(2 * lp)
    p2[..., blank] = 0
    for u in range(U1 - 1):
        p2[:, u, y[u]] = 0
    with np.errstate(divide="ignore"):
        log_p2_others = np.log(p2.sum(-1))
    return {"blank_lp": blank_lp.astype(dtype), "emit_lp": emit_lp.astype(dtype),
            "log_p2_others": log_p2_others.astype(dtype), "labels": y}


def utt(T=4, U=2, seed=0, dtype=np.float32, **extra) -> dict:
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, V, U)
    return {**lattice_of(rng.normal(size=(T, U + 1, V)), labels, dtype=dtype), **extra}


def one_line(excinfo, path, *needles) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for n in needles:
        assert n in msg, msg
    return msg


def add_vocab(path, names="_abcd") -> None:
    with h5py.File(path, "r+") as f:
        f["vocab"] = np.array(list(names), dtype=h5py.string_dtype())


def read_all(path, **kw):
    with DumpReader(path, **kw) as r:
        return [r.read_lattice(u) for u in r.utt_ids]


# --------------------------------------------------------------------------- valid files
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lattice_dump_round_trips_bitwise(tmp_path, dtype):
    utts = {"a": utt(4, 2, 0, dtype, text="hello", loss=1.5), "b": utt(3, 0, 1, dtype),
            "c": utt(1, 3, 2, dtype)}
    utts["c"]["log_p2_others"][0, 3] = -np.inf  # a probability of 0 is legal
    utts["c"]["emit_lp"][0, 1] = -np.inf
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, utts)
    add_vocab(path)
    with DumpReader(path) as r:
        assert (r.kind, r.layout, r.vocab_size, r.blank) == ("lattice", "keyed", V, 0)
        assert r.vocab == list("_abcd") and r.utt_ids == ["a", "b", "c"]
        for u, want in utts.items():
            info = r.info(u)
            T, U = want["blank_lp"].shape[0], want["labels"].shape[0]
            assert (info.kind, info.T, info.U, info.V, info.dtype) == ("lattice", T, U, V,
                                                                       np.dtype(dtype))
            assert info.region is None and not info.has_grads
            assert info.node_bytes == 3 * np.dtype(dtype).itemsize
            assert info.nbytes == T * (U + 1) * 3 * np.dtype(dtype).itemsize
            got = r.read_lattice(u)
            assert isinstance(got, LatticeUtterance) and got.info == info
            assert got.labels.dtype == np.int64
            np.testing.assert_array_equal(got.labels, want["labels"])
            for name, shape in LATTICE_DATASETS.items():
                a = getattr(got, name)
                assert a.dtype == np.dtype(dtype) and a.shape == shape(T, U)
                assert a.tobytes() == want[name].tobytes(), name
        assert r.info("a").attrs == {"text": "hello", "loss": 1.5}
        assert r.info("b").attrs == {}
        # checked()/batches() work for lattice dumps as for full ones
        assert [i.utt_id for i, _ in r.checked(["c", "a"])] == ["c", "a"]


def test_big_endian_and_compressed_lattice_arrays_read_as_native(tmp_path):
    u = utt(5, 3, 3)
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u": {"labels": u["labels"]}})
    with h5py.File(path, "r+") as f:
        g = f["utts/u"]
        g.create_dataset("blank_lp", data=u["blank_lp"].astype(">f4"))
        g.create_dataset("emit_lp", data=u["emit_lp"], compression="gzip", chunks=(2, 3))
        g.create_dataset("log_p2_others", data=u["log_p2_others"], compression="lzf",
                         chunks=(1, 4))
    got = read_all(path)[0]
    assert got.info.dtype == np.float32 and got.blank_lp.dtype == np.float32
    for name in LATTICE_DATASETS:
        np.testing.assert_array_equal(getattr(got, name), u[name])


def test_full_dumps_of_both_versions_still_read_as_full(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 3, V)).astype(np.float32)
    v1 = tmp_path / "v1.h5"
    write_keyed_raw(v1, {"u": (x, np.array([1, 2]))}, format="rnntool.dump", format_version=1,
                    blank=0)
    v2 = tmp_path / "v2.h5"
    with DumpWriter(v2) as w:
        w.add("u", x, [1, 2])
    with h5py.File(v2) as f:
        assert f.attrs["format_version"] == 2 and f.attrs["dump_kind"] == "full"
    padded = tmp_path / "padded.h5"
    write_padded_raw(padded, x[None], np.array([[1, 2]]), np.array([3]), np.array([2]))
    for path in (v1, v2, padded):
        with DumpReader(path) as r:
            assert r.kind == "full"
            u = r.utt_ids[0]
            info = r.info(u)
            assert info.kind == "full" and info.node_bytes == V * 4
            np.testing.assert_array_equal(r.read(u).logits, x)
            with pytest.raises(DumpError) as e:
                r.read_lattice(u)
            one_line(e, path, f"utterance {u}: a full dump holds logits, not a lattice")


def test_blank_override_equal_modulo_v_is_accepted(tmp_path):
    path = tmp_path / "lat.h5"
    u = utt()
    u["labels"] = np.array([1, 2])
    write_lattice_raw(path, {"u": u}, blank=V - 1)
    for blank in (V - 1, -1):
        with DumpReader(path, blank=blank) as r:
            assert r.blank == V - 1
            np.testing.assert_array_equal(r.read_lattice("u").labels, [1, 2])


def test_group_by_budget_and_padded_bytes_use_node_bytes():
    lat = [UttInfo(f"u{k}", 10, 9, 1000, np.dtype(np.float32), kind="lattice")
           for k in range(4)]
    full = UttInfo("f", 10, 9, 1000, np.dtype(np.float32))
    node = 3 * 4
    assert lat[0].node_bytes == node and full.node_bytes == 4000
    assert padded_bytes(lat[:2]) == 2 * 10 * 10 * node
    # All four lattices fit 4 * 100 nodes * 12 bytes; as logits one would not fit.
    groups = list(group_by_budget([(i, None) for i in lat], 4 * 100 * node))
    assert [len(g) for g in groups] == [4]
    groups = list(group_by_budget([(i, None) for i in lat], 2 * 100 * node))
    assert [len(g) for g in groups] == [2, 2]
    # A lattice and full logits of the same dtype and V never share a group.
    groups = list(group_by_budget([(lat[0], None), (full, None)], 1 << 30))
    assert sorted(len(g) for g in groups) == [1, 1]


# --------------------------------------------------------------------------- bad files
def _bad(name: str, how):
    """An utterance ``u1`` whose dataset ``name`` is replaced by ``how(good)``."""
    def make():
        u = utt(4, 2, 1)
        u[name] = how(u[name])
        return u
    return make


BAD_UTTS = [
    # shapes that disagree, each dataset
    (_bad("blank_lp", lambda a: a[:, :2]),
     "blank_lp has shape (4, 2), but labels (2,) make it (T, U+1) = (4, 3)"),
    (_bad("emit_lp", lambda a: a[:3]),
     "emit_lp has shape (3, 2), but blank_lp (4, 3) and labels (2,) make it (T, U) = (4, 2)"),
    (_bad("emit_lp", lambda a: np.zeros((4, 3), a.dtype)),
     "emit_lp has shape (4, 3), but blank_lp (4, 3) and labels (2,) make it (T, U) = (4, 2)"),
    (_bad("log_p2_others", lambda a: a[:, :2]),
     "log_p2_others has shape (4, 2), but blank_lp (4, 3) and labels (2,) make it "
     "(T, U+1) = (4, 3)"),
    (_bad("labels", lambda a: a[:1]),
     "blank_lp has shape (4, 3), but labels (1,) make it (T, U+1) = (4, 2)"),
    (_bad("blank_lp", lambda a: a[:, :, None]), "blank_lp must be (T, U+1), got shape (4, 3, 1)"),
    (_bad("emit_lp", lambda a: a.ravel()), "emit_lp must be (T, U), got shape (8,)"),
    (_bad("labels", lambda a: a[None]), "labels must be (U,), got shape (1, 2)"),
    (_bad("blank_lp", lambda a: a[:0]), "T = 0, an utterance needs T >= 1"),
    # dtypes
    (_bad("emit_lp", lambda a: a.astype(np.float64)),
     "emit_lp dtype float64 differs from blank_lp's float32"),
    (_bad("log_p2_others", lambda a: a.astype(np.float64)),
     "log_p2_others dtype float64 differs from blank_lp's float32"),
    (_bad("blank_lp", lambda a: a.astype(np.float16)), "blank_lp dtype float16 is not float32/64"),
    (_bad("emit_lp", lambda a: a.astype(np.float16)), "emit_lp dtype float16 is not float32/64"),
    (_bad("log_p2_others", lambda a: a.astype(np.int32)),
     "log_p2_others dtype int32 is not float32/64"),
    (_bad("labels", lambda a: a.astype(np.float32)), "labels dtype float32 is not an integer"),
    # labels
    (_bad("labels", lambda a: np.array([1, V])), f"labels[1] = {V} is outside [0, {V})"),
    (_bad("labels", lambda a: np.array([-3, 1])), f"labels[0] = -3 is outside [0, {V})"),
    (_bad("labels", lambda a: np.array([1, 0])), "labels[1] = 0 equals blank"),
    # missing or not datasets
    (lambda: {k: v for k, v in utt().items() if k != "emit_lp"}, "missing dataset emit_lp"),
    (lambda: {k: v for k, v in utt().items() if k != "labels"}, "missing dataset labels"),
    # attributes, as for full dumps
    (lambda: utt(text=3), "attribute text = 3 is not a string"),
    (lambda: utt(loss="x"), "attribute loss = 'x' is not a number"),
]


@pytest.mark.parametrize("make,needle", BAD_UTTS, ids=[n for _, n in BAD_UTTS])
def test_a_bad_utterance_is_one_line_naming_file_and_utterance(tmp_path, make, needle):
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u0": utt(3, 1, 9), "u1": make()})
    with DumpReader(path) as r:
        r.read_lattice("u0")  # the good one still reads
        with pytest.raises(DumpError) as e:
            r.read_lattice("u1")
    one_line(e, path, f"utterance u1: {needle}")


@pytest.mark.parametrize("name", list(LATTICE_DATASETS))
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_plus_inf_is_bad_input_naming_array_and_position(tmp_path, name, value):
    u = utt(4, 2, 1)
    u[name][2, 1] = value
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": u})
    with DumpReader(path) as r:
        info = r.info("u1")  # the values are not read until read_lattice
        with pytest.raises(DumpError) as e:
            r.read_lattice("u1", info)
    msg = one_line(e, path, f"utterance u1: {name}[t=2, u=1] = {value!r}; a lattice dump "
                   "holds finite log-probs or -inf")
    assert "more" not in msg


def test_more_bad_values_are_counted(tmp_path):
    u = utt(4, 2, 1)
    u["log_p2_others"][1, 2] = np.inf
    u["log_p2_others"][3, 0] = np.nan
    u["log_p2_others"][3, 1:] = np.nan
    u["emit_lp"][:] = -np.inf  # legal: no mass on the next label, not a bad value
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": u})
    with pytest.raises(DumpError) as e:
        read_all(path)
    one_line(e, path, "utterance u1: log_p2_others[t=1, u=2] = inf (and 3 more); a lattice")


def test_a_dataset_never_written_is_refused_not_read_as_zeros(tmp_path):
    u = utt(4, 2, 1)
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": {k: v for k, v in u.items() if k != "emit_lp"}})
    with h5py.File(path, "r+") as f:
        f["utts/u1"].create_dataset("emit_lp", shape=(4, 2), dtype=np.float32)
    with pytest.raises(DumpError) as e:
        read_all(path)
    one_line(e, path, "utterance u1: emit_lp was never written")


def test_external_storage_is_refused(tmp_path):
    u = utt(4, 2, 1)
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": {k: v for k, v in u.items() if k != "log_p2_others"}})
    raw = tmp_path / "raw.bin"
    raw.write_bytes(u["log_p2_others"].tobytes())
    with h5py.File(path, "r+") as f:
        f["utts/u1"].create_dataset("log_p2_others", shape=(4, 3), dtype=np.float32,
                                    external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
    with pytest.raises(DumpError) as e:
        read_all(path)
    one_line(e, path, "utterance u1: log_p2_others keeps its data in external files")


def test_lattice_arrays_behind_external_links_read_from_their_file(tmp_path):
    u = utt(4, 2, 1)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["emit"] = u["emit_lp"]
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": {**u, "emit_lp": h5py.ExternalLink("other.h5", "emit")}})
    got = read_all(path)[0]
    np.testing.assert_array_equal(got.emit_lp, u["emit_lp"])
    gone = tmp_path / "gone.h5"
    write_lattice_raw(gone, {"u1": {**u, "emit_lp": h5py.ExternalLink("nothere.h5", "e")}})
    with pytest.raises(DumpError) as e:
        read_all(gone)
    one_line(e, gone, "external link to nothere.h5, which does not exist")


def test_read_on_a_lattice_dump_says_it_holds_no_logits(tmp_path):
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": utt()})
    with DumpReader(path) as r:
        info = r.info("u1")
        for call in (lambda: r.read("u1"),
                     lambda: r.read_logits_into("u1", info, np.empty((4, 3, V), np.float32))):
            with pytest.raises(DumpError) as e:
                call()
            one_line(e, path, 'utterance u1: a lattice dump holds no logits (it was written '
                     'with kind="lattice")')


ROOT_PROBLEMS = [
    ({"vocab_size": None},
     "a lattice dump must record the vocabulary size of its logits (attribute vocab_size "
     ">= 1); it has no attribute vocab_size"),
    ({"vocab_size": -1}, "must record the vocabulary size of its logits"),
    ({"vocab_size": 0}, "it has attribute vocab_size = 0"),
    ({"vocab_size": 4}, "/vocab has 5 names but attribute vocab_size is 4"),
    ({"dump_kind": "x"}, "attribute dump_kind = 'x' is not one of full, lattice"),
    ({"dump_kind": 3}, "attribute dump_kind = 3 is not one of full, lattice"),
    ({"dump_kind": b"\xff"}, "attribute dump_kind = '\\udcff' is not one of full, lattice"),
    ({"format_version": 1}, "dump_kind = 'lattice' needs format_version >= 2, the file has 1"),
]


@pytest.mark.parametrize("attrs,needle", ROOT_PROBLEMS, ids=[n for _, n in ROOT_PROBLEMS])
def test_root_problems_are_one_line_naming_the_file(tmp_path, attrs, needle):
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": utt()}, **attrs)
    add_vocab(path)
    with pytest.raises(DumpError) as e:
        read_all(path)
    one_line(e, path, needle)


def test_a_lattice_dump_without_utts_is_an_error(tmp_path):
    path = tmp_path / "lat.h5"
    x = np.zeros((1, 3, 3, V), np.float32)
    write_padded_raw(path, x, np.array([[1, 2]]), np.array([3]), np.array([2]),
                     format_version=2, dump_kind="lattice", vocab_size=V)
    with pytest.raises(DumpError) as e:
        DumpReader(path)
    one_line(e, path, "attribute dump_kind = 'lattice' but there is no group /utts")


@pytest.mark.parametrize("asked", [1, -1, V, -V - 1])
def test_a_blank_override_that_differs_is_an_error(tmp_path, asked):
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": utt()}, blank=0)
    with pytest.raises(DumpError) as e:
        DumpReader(path, blank=asked)
    one_line(e, path, f"blank {asked} was asked for, but this lattice dump was computed with "
             f"blank = 0 (V = {V}); a lattice dump's blank cannot be overridden")


def test_a_stored_blank_outside_the_vocabulary_is_an_error(tmp_path):
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u1": utt()}, blank=V)
    with DumpReader(path) as r, pytest.raises(DumpError) as e:
        r.read_lattice("u1")
    one_line(e, path, f"utterance u1: blank = {V} is outside [-V, V) for V = {V}")
