"""DumpWriter(kind="lattice"): the lattice of the logits it is given, exactly what the
engine computes, trimmed to each utterance's lengths; refusals as for a full dump."""

import os

import numpy as np
import pytest
import torch
from helpers import SMALL_LAUNCHES, random_batch, read_lattice_dump
from test_dump_atomic import BAD_ADD, BAD_BATCH, GOOD_X, GOOD_Y

from rnntool.dump import LATTICE_DATASETS, DumpWriter
from rnntool.engine import LossOptions, load_engine
from rnntool.reader import DumpReader

V = 7
NAMES = tuple(LATTICE_DATASETS)


def batch(dtype, B=4, T=6, U=3, seed=0, blank=0):
    """A padded batch with varied lengths; logits in ``dtype`` (a torch dtype: a tensor,
    a numpy dtype: an array)."""
    x, y, t_len, u_len = random_batch(B, T, U, V, seed=seed, scale=3.0, blank=blank)
    if isinstance(dtype, torch.dtype):
        x = x.to(dtype)
    else:
        x = x.numpy().astype(dtype)
    return x, y.numpy(), t_len.numpy(), u_len.numpy()


def engine_terms(x, y, t_len, u_len, blank=0, fused=True):
    """The CPU engine's LatticeTerms of a padded batch (targets with padding cleared)."""
    targets = np.where(y < 0, 0, y).astype(np.int64)
    return load_engine("cpu").lattice_terms(x, targets, t_len.astype(np.int64),
                                            u_len.astype(np.int64),
                                            LossOptions(blank=blank, fused=fused))


def trimmed(terms, b, T, U) -> dict:
    return {name: getattr(terms, name)[b, :shape[0], :shape[1]]
            for name, shape in ((n, f(T, U)) for n, f in LATTICE_DATASETS.items())}


def assert_bitwise(got: dict, want: dict) -> None:
    for name in NAMES:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert got[name].tobytes() == want[name].tobytes(), name


DTYPES = [np.float16, torch.bfloat16, np.float32, torch.float32, np.float64]
IDS = ["float16-numpy", "bfloat16-torch", "float32-numpy", "float32-torch", "float64-numpy"]


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_add_batch_round_trips_the_engine_bit_for_bit(tmp_path, dtype):
    x, y, t_len, u_len = batch(dtype)
    terms = engine_terms(x, y, t_len, u_len)
    lattice = np.float64 if dtype == np.float64 else np.float32
    path = tmp_path / "lat.h5"
    with DumpWriter(path, kind="lattice") as w:
        ids = w.add_batch(x, y, t_len, u_len, utt_ids=["a", "b", "c", "d"],
                          losses=[1.0, None, 3.0, 4.0], texts=["x", "y", None, "w"])
    assert ids == ["a", "b", "c", "d"]
    with DumpReader(path) as r:
        assert (r.kind, r.vocab_size, r.blank, r.input_kind) == ("lattice", V, 0, "logits")
        for b, u in enumerate(ids):
            T, U = int(t_len[b]), int(u_len[b])
            got = r.read_lattice(u)
            assert (got.info.T, got.info.U, got.info.dtype) == (T, U, np.dtype(lattice))
            assert_bitwise(vars(got), trimmed(terms, b, T, U))
            np.testing.assert_array_equal(got.labels, y[b, :U])
        assert r.info("a").attrs == {"loss": 1.0, "text": "x"}
        assert r.info("b").attrs == {"text": "y"}
        assert r.info("c").attrs == {"loss": 3.0}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_add_round_trips_the_engine_bit_for_bit(tmp_path, dtype):
    x, y, t_len, u_len = batch(dtype, seed=3)
    path = tmp_path / "lat.h5"
    with DumpWriter(path, kind="lattice", vocab=[f"t{v}" for v in range(V)]) as w:
        for b in range(len(t_len)):
            T, U = int(t_len[b]), int(u_len[b])
            w.add(f"u{b}", x[b, :T, : U + 1], y[b, :U], loss=float(b), text=f"t{b}")
    root, utts = read_lattice_dump(path)
    terms = engine_terms(x, y, t_len, u_len)  # the padded batch: same bits per node
    for b in range(len(t_len)):
        T, U = int(t_len[b]), int(u_len[b])
        assert_bitwise(utts[f"u{b}"], trimmed(terms, b, T, U))
        assert utts[f"u{b}"]["attrs"] == {"loss": float(b), "text": f"t{b}"}
    assert root["vocab"] == [f"t{v}" for v in range(V)] and root["vocab_size"] == V


def test_root_attributes(tmp_path):
    x, y, t_len, u_len = batch(np.float32)
    with DumpWriter(tmp_path / "lat.h5", blank=-1, input_kind="log_probs", kind="lattice",
                    compression="gzip") as w:
        w.add_batch(x, np.where(y == V - 1, 1, y), t_len, u_len)
    root, utts = read_lattice_dump(tmp_path / "lat.h5")
    assert root == {"format": "rnntool.dump", "format_version": 2, "dump_kind": "lattice",
                    "blank": -1, "vocab_size": V, "input_kind": "log_probs", "vocab": None,
                    "model_kind": "rnnt"}
    assert sorted(utts) == ["0", "1", "2", "3"]
    with DumpWriter(tmp_path / "full.h5") as w:
        w.add_batch(x, y, t_len, u_len)
    root, _ = read_lattice_dump(tmp_path / "full.h5")
    assert (root["dump_kind"], root["format_version"]) == ("full", 2)


@pytest.mark.parametrize("blank, fused", [(-1, True), (3, False)])
def test_blank_and_input_kind_reach_the_engine(tmp_path, blank, fused):
    x, y, t_len, u_len = batch(np.float32, seed=5, blank=blank)
    with DumpWriter(tmp_path / "lat.h5", blank=blank, kind="lattice",
                    input_kind="logits" if fused else "log_probs") as w:
        w.add_batch(x, y, t_len, u_len)
    _, utts = read_lattice_dump(tmp_path / "lat.h5")
    terms = engine_terms(x, y, t_len, u_len, blank=blank % V, fused=fused)
    for b in range(len(t_len)):
        assert_bitwise(utts[str(b)], trimmed(terms, b, int(t_len[b]), int(u_len[b])))


def test_a_lattice_dump_scores_to_the_full_dumps_bits(tmp_path):
    # float64 logits: the lattice is float64, and stage 2 on it is what the full dump's
    # forward runs on; float32: the same float32 lattice either way.
    for dtype in (np.float64, np.float32):
        x, y, t_len, u_len = batch(dtype, seed=7)
        with DumpWriter(tmp_path / f"{dtype.__name__}.h5", kind="lattice") as w:
            w.add_batch(x, y, t_len, u_len)
        _, utts = read_lattice_dump(tmp_path / f"{dtype.__name__}.h5")
        engine = load_engine("cpu")
        targets = np.where(y < 0, 0, y).astype(np.int64)
        full = engine.forward(x, targets, t_len, u_len, LossOptions(blank=0), False)
        for b in range(len(t_len)):
            T, U = int(t_len[b]), int(u_len[b])
            u = utts[str(b)]
            blank_lp = np.full((1, T, U + 1), -np.inf, u["blank_lp"].dtype)
            emit_lp = np.full((1, T, U + 1), -np.inf, u["blank_lp"].dtype)
            blank_lp[0] = u["blank_lp"]
            emit_lp[0, :, :U] = u["emit_lp"]
            state = engine.forward_compact(blank_lp, emit_lp, targets[b : b + 1, :U],
                                           np.array([T]), np.array([U]), False)
            assert state.log_like[0].tobytes() == full.log_like[b].tobytes()


def test_padding_is_never_read(tmp_path):
    # NaN and +inf outside the lengths (and -inf inside) are fine: they are not the
    # utterance's logits.
    x, y, t_len, u_len = batch(np.float32)
    t_len[1], u_len[1], y[1, 0] = 2, 1, 3
    x[1, 2:] = np.nan
    x[1, :, 2:] = np.inf
    x[0, 0, 0, 1] = -np.inf
    with DumpWriter(tmp_path / "lat.h5", kind="lattice") as w:
        w.add_batch(x, y, t_len, u_len)
    with DumpReader(tmp_path / "lat.h5") as r:
        got = r.read_lattice("1")
        assert got.blank_lp.shape == (2, 2) and np.isfinite(got.blank_lp).all()
        r.read_lattice("0")


def test_empty_batch_and_utterances_without_labels(tmp_path):
    x, y, t_len, u_len = batch(np.float32)
    u_len[:] = 0
    with DumpWriter(tmp_path / "lat.h5", kind="lattice") as w:
        assert w.add_batch(x[:0], y[:0], t_len[:0], u_len[:0]) == []
        w.add_batch(x, y, t_len, u_len)
        w.add("one", x[0, :1, :1], np.zeros(0, np.int64))
    with DumpReader(tmp_path / "lat.h5") as r:
        got = r.read_lattice("one")
        assert got.emit_lp.shape == (1, 0) and got.blank_lp.shape == (1, 1)
        assert r.read_lattice("2").emit_lp.shape == (int(t_len[2]), 0)
    with DumpWriter(tmp_path / "full.h5") as w:  # a full dump takes an empty batch too
        assert w.add_batch(x[:0], y[:0], t_len[:0], u_len[:0]) == []


# --------------------------------------------------------------------------- lattice_dtype
@pytest.mark.parametrize("logits, asked, stored", [
    (np.float32, None, np.float32), (np.float64, None, np.float64),
    (np.float16, None, np.float32), (np.float64, "float32", np.float32),
    (np.float32, "float64", np.float32), (np.float64, np.float64, np.float64),
    (np.float32, np.dtype(np.float32), np.float32),
])
def test_lattice_dtype(tmp_path, logits, asked, stored):
    x, y, t_len, u_len = batch(logits)
    with DumpWriter(tmp_path / "lat.h5", kind="lattice", lattice_dtype=asked) as w:
        w.add_batch(x, y, t_len, u_len)
    _, utts = read_lattice_dump(tmp_path / "lat.h5")
    terms = engine_terms(x, y, t_len, u_len)
    for b in range(len(t_len)):
        want = {k: v.astype(stored) for k, v in
                trimmed(terms, b, int(t_len[b]), int(u_len[b])).items()}
        assert_bitwise(utts[str(b)], want)  # the engine's values, rounded (never widened)


@pytest.mark.parametrize("kw", [{"lattice_dtype": "float16"}, {"lattice_dtype": "int32"},
                                {"lattice_dtype": "nonsense"}, {"kind": "logits"},
                                {"backend": "gpu"}, {"kind": "full", "lattice_dtype": "float32"},
                                {"vocab_size": 0}, {"vocab": list("ab"), "vocab_size": 3}])
def test_bad_arguments(tmp_path, kw):
    kw = {"kind": "lattice", **kw}
    with pytest.raises(ValueError):
        DumpWriter(tmp_path / "lat.h5", **kw)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- the CUDA engine
def test_simulated_cuda_matches_the_cpu(tmp_path):
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("runs the CUDA kernels in Numba's simulator")
    x, y, t_len, u_len = batch(np.float32, B=3, T=4, U=2)
    got = {}
    with cuda.config(**SMALL_LAUNCHES):
        for backend, logits in (("cuda", torch.from_numpy(x)), ("cuda-numpy", x),
                                ("cpu", x), ("auto", torch.from_numpy(x))):
            path = tmp_path / f"{backend}.h5"
            with DumpWriter(path, kind="lattice", backend=backend.removesuffix("-numpy")) as w:
                w.add_batch(logits, y, t_len, u_len)
                w.add("single", logits[0, :2, :2], y[0, :1])
            got[backend] = read_lattice_dump(path)
    _, cpu = got.pop("cpu")
    for backend, (root, utts) in got.items():
        assert root["dump_kind"] == "lattice" and sorted(utts) == sorted(cpu)
        for u in cpu:
            for name in NAMES:
                assert utts[u][name].dtype == cpu[u][name].dtype
                np.testing.assert_allclose(utts[u][name], cpu[u][name], rtol=1e-6, atol=1e-6,
                                           err_msg=f"{backend} {u} {name}")
    for u in cpu:  # "auto" on CPU tensors is the CPU engine
        assert_bitwise(got["auto"][1][u], cpu[u])


def test_simulated_cuda_refuses_nan_too(tmp_path):
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("runs the CUDA kernels in Numba's simulator")
    x, y, t_len, u_len = batch(np.float32, B=2, T=3, U=2)
    x[1, 0, 0, 2] = np.nan
    with cuda.config(**SMALL_LAUNCHES), DumpWriter(tmp_path / "lat.h5", kind="lattice",
                                                   backend="cuda") as w:
        with pytest.raises(ValueError, match="utterance '1': NaN or \\+inf in its logits"):
            w.add_batch(torch.from_numpy(x), y, t_len, u_len)
        assert list(w._utts) == []
        w.add_batch(torch.from_numpy(x[:1]), y[:1], t_len[:1], u_len[:1])


def test_tensors_the_cpu_backend_cannot_run_are_refused(tmp_path):
    # A tensor on another device (here "meta"; a CUDA tensor alike) with backend "cpu" or
    # "auto": the CPU engine's ValueError, before anything is copied or written.
    x = torch.empty(1, 3, 3, V, device="meta")
    with DumpWriter(tmp_path / "lat.h5", kind="lattice", backend="cpu", vocab_size=V) as w:
        for call in (lambda: w.add_batch(x, [[1, 2]], [3], [2]),
                     lambda: w.add("u", x[0], [1, 2])):
            with pytest.raises(ValueError, match="needs CPU tensors; logits are on meta"):
                call()
        assert list(w._utts) == []


# --------------------------------------------------------------------------- refusals
NAN_CASES = [("nan", np.nan), ("+inf", np.inf)]


@pytest.mark.parametrize("what, value", NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_nan_or_inf_refuses_the_whole_batch_and_the_writer_stays_usable(tmp_path, what, value):
    x, y, t_len, u_len = batch(np.float32)
    x[2, int(t_len[2]) - 1, int(u_len[2]), 4] = value
    path = tmp_path / "lat.h5"
    with DumpWriter(path, kind="lattice") as w:
        w.add("before", x[0], y[0])
        with pytest.raises(ValueError) as e:
            w.add_batch(x, y, t_len, u_len, utt_ids=["a", "b", "c", "d"])
        assert str(e.value) == ("utterance 'c': NaN or +inf in its logits; a lattice dump "
                                "cannot store them (score the full logits to find where)")
        assert sorted(w._utts) == ["before"]
        with pytest.raises(ValueError, match="utterance 'one': NaN or \\+inf"):
            w.add("one", x[2, : int(t_len[2]), : int(u_len[2]) + 1], y[2, : int(u_len[2])])
        assert sorted(w._utts) == ["before"]
        x[2, int(t_len[2]) - 1, int(u_len[2]), 4] = 0.0
        assert w.add_batch(x, y, t_len, u_len, utt_ids=["a", "b", "c", "d"]) == list("abcd")
    with DumpReader(path) as r:
        assert sorted(r.utt_ids) == ["a", "b", "before", "c", "d"]


def test_grads_are_refused(tmp_path):
    x, y, t_len, u_len = batch(np.float32)
    with DumpWriter(tmp_path / "lat.h5", kind="lattice", vocab_size=V) as w:
        with pytest.raises(ValueError, match="a lattice dump stores no gradients"):
            w.add("u", x[0], y[0], grads=np.zeros_like(x[0]))
        with pytest.raises(ValueError, match="a lattice dump stores no gradients"):
            w.add_batch(x, y, t_len, u_len, grads=np.zeros_like(x))
        assert list(w._utts) == []


def _refusal(path, kind, setup, call):
    """The exception ``call(writer)`` raises on a writer of ``kind`` after ``setup(writer)``
    (None if none); it must write nothing and leave the writer usable."""
    with DumpWriter(path, kind=kind) as w:
        setup(w)
        before = sorted(w._utts)
        try:
            call(w)
        except (ValueError, TypeError) as e:
            assert sorted(w._utts) == before
            w.add("retry", GOOD_X, GOOD_Y)
            return e
    return None


NO_GRADS = [c for c in BAD_ADD if "grads" not in c[1]]


@pytest.mark.parametrize("what, bad", NO_GRADS, ids=[c[0] for c in NO_GRADS])
def test_bad_add_is_refused_as_for_a_full_dump(tmp_path, what, bad):
    bad = dict(bad)
    first = bad.pop("first_v", None)
    x, y = bad.pop("logits", GOOD_X), bad.pop("labels", GOOD_Y)

    def setup(w):
        if first:
            w.add("first", GOOD_X, GOOD_Y)

    full = _refusal(tmp_path / "full.h5", "full", setup, lambda w: w.add("u1", x, y, **bad))
    lattice = _refusal(tmp_path / "lat.h5", "lattice", setup, lambda w: w.add("u1", x, y, **bad))
    assert full is not None
    assert (type(lattice), str(lattice)) == (type(full), str(full))


BATCH_NO_GRADS = [c for c in BAD_BATCH if "grads" not in c[1]]


@pytest.mark.parametrize("what, bad", BATCH_NO_GRADS, ids=[c[0] for c in BATCH_NO_GRADS])
def test_bad_batch_is_refused_as_for_a_full_dump(tmp_path, what, bad):
    good = {"logits": torch.randn(2, 4, 3, 5), "labels": torch.tensor([[1, 2], [3, 1]]),
            "logit_lengths": torch.tensor([4, 3]), "label_lengths": torch.tensor([2, 1]),
            "utt_ids": ["a", "b"], "losses": torch.tensor([1.0, 2.0]), "texts": ["x", "y"]}

    def setup(w):
        if "old" in bad.get("utt_ids", ()):
            w.add("old", torch.zeros(2, 1, 5), [])

    def call(w):
        w.add_batch(**{**good, **bad})

    full = _refusal(tmp_path / "full.h5", "full", setup, call)
    lattice = _refusal(tmp_path / "lat.h5", "lattice", setup, call)
    assert full is not None
    assert (type(lattice), str(lattice)) == (type(full), str(full))


# --------------------------------------------------------------------------- files
def test_a_lattice_dump_is_far_smaller_than_the_full_dump(tmp_path):
    g = torch.Generator().manual_seed(0)
    B, T, U, Vbig = 4, 50, 20, 512
    x = torch.randn(B, T, U + 1, Vbig, generator=g).to(torch.float16).numpy()
    y = torch.randint(1, Vbig, (B, U), generator=g).numpy()
    t_len, u_len = np.full(B, T), np.full(B, U)
    for kind in ("full", "lattice"):
        with DumpWriter(tmp_path / f"{kind}.h5", kind=kind) as w:
            w.add_batch(x, y, t_len, u_len)
    full, lattice = (os.path.getsize(tmp_path / f"{k}.h5") for k in ("full", "lattice"))
    assert full / lattice > 50, (full, lattice)


def test_an_interrupted_writer_leaves_no_file(tmp_path):
    x, y, t_len, u_len = batch(np.float32)
    with pytest.raises(KeyboardInterrupt), DumpWriter(tmp_path / "lat.h5", kind="lattice") as w:
        w.add_batch(x, y, t_len, u_len)
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_an_empty_lattice_dump_needs_its_vocabulary_size(tmp_path):
    with DumpWriter(tmp_path / "known.h5", kind="lattice", vocab_size=V):
        pass
    with DumpReader(tmp_path / "known.h5") as r:
        assert (r.kind, r.vocab_size, len(r)) == ("lattice", V, 0)
    w = DumpWriter(tmp_path / "unknown.h5", kind="lattice")
    with pytest.raises(ValueError, match="must record the vocabulary size"):
        w.close()
    assert os.listdir(tmp_path) == ["known.h5"]
