"""rnntool.engine: the contract between the backends and the rest (typed options, typed
forward state, the ENGINES table, ImpossibleLossWarning), on every backend."""

import copy
import dataclasses
import importlib
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import random_batch

import rnntool
from rnntool import engine as engine_module
from rnntool.engine import (
    ENGINES,
    Engine,
    ForwardState,
    ImpossibleLossWarning,
    LatticeTerms,
    LossOptions,
    load_engine,
)
from rnntool.reference import reference_gradients, reference_rnnt_loss


def as_numpy(a):
    """A state's array (numpy on the CPU, a torch tensor on CUDA) as numpy."""
    return a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# --------------------------------------------------------------------------- LossOptions
def test_loss_options_defaults():
    opts = LossOptions(blank=3)
    assert (opts.blank, opts.fused, opts.clamp, opts.fastemit_lambda, opts.reduction) == (
        3, True, 0.0, 0.0, "none")
    with pytest.raises(TypeError):
        LossOptions()  # blank has no default


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LossOptions)])
def test_loss_options_are_frozen(field):
    opts = LossOptions(blank=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(opts, field, 1)
    assert opts == LossOptions(blank=0)


def test_loss_options_are_values():
    a = LossOptions(blank=1, fused=False, clamp=0.5, fastemit_lambda=0.1, reduction="sum")
    b = LossOptions(blank=1, fused=False, clamp=0.5, fastemit_lambda=0.1, reduction="sum")
    assert a == b and hash(a) == hash(b)
    assert a != dataclasses.replace(b, clamp=0.25)
    assert {a, b} == {a}


# --------------------------------------------------------------------------- ForwardState
def test_forward_state_fields():
    names = [f.name for f in dataclasses.fields(ForwardState)]
    assert names == ["log_like", "bad", "blank_lp", "emit_lp", "targets", "logit_lengths",
                     "target_lengths", "lse", "alpha", "beta"]
    state = ForwardState(*range(7))
    assert (state.lse, state.alpha, state.beta) == (None, None, None)  # kept only on request
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.alpha = 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("keep_state", [False, True])
def test_forward_state_of_each_backend(backend, dtype, keep_state):
    """The arrays' shapes and types as ForwardState's docstring gives them, log P the
    reference's, -inf outside the lengths."""
    B, T, U, V = 3, 4, 2, 5
    x, y, t_len, u_len = random_batch(B, T, U, V, seed=21, dtype=dtype)
    t_len[1], u_len[1] = 2, 1  # padding in both dims
    state = load_engine(backend).forward(x, y, t_len, u_len, LossOptions(blank=0), keep_state)
    assert isinstance(state, ForwardState)
    lat = np.float64 if dtype == torch.float64 else np.float32
    log_like, bad = as_numpy(state.log_like), as_numpy(state.bad)
    assert log_like.shape == (B,) and log_like.dtype == np.float64
    assert bad.shape == (B,) and bad.dtype == np.bool_ and not bad.any()
    want = reference_rnnt_loss(x.double(), y, t_len, u_len).numpy()
    np.testing.assert_allclose(-log_like, want, rtol=1e-5, atol=2e-4)
    for name in ("blank_lp", "emit_lp"):
        a = as_numpy(getattr(state, name))
        assert a.shape == (B, T, U + 1) and a.dtype == lat, name
        for b in range(B):
            # Nodes with an arc of that kind: every node within the lengths has a blank,
            # all but those at u = U_b have a next label.
            arcs = np.zeros((T, U + 1), bool)
            arcs[: int(t_len[b]), : int(u_len[b]) + (name == "blank_lp")] = True
            assert np.isfinite(a[b][arcs]).all(), (name, b)
            assert (a[b][~arcs] == -np.inf).all(), (name, b)
    for name, shape in (("targets", (B, U)), ("logit_lengths", (B,)), ("target_lengths", (B,))):
        a = as_numpy(getattr(state, name))
        assert a.dtype == np.int64, name
        if name != "targets":  # (CUDA keeps a valid shape for S = 0, see cuda_forward)
            assert a.shape == shape, name
    np.testing.assert_array_equal(as_numpy(state.logit_lengths), t_len.numpy())
    np.testing.assert_array_equal(as_numpy(state.target_lengths), u_len.numpy())
    if not keep_state:
        assert (state.lse, state.alpha, state.beta) == (None, None, None)
        return
    lse = as_numpy(state.lse)
    assert lse.shape == (B, T, U + 1, 2) and lse.dtype == lat
    alpha, beta = as_numpy(state.alpha), as_numpy(state.beta)
    for a in (alpha, beta):
        assert a.shape == (B, T, U + 1) and a.dtype == np.float64
    for b in range(B):
        t, u = int(t_len[b]), int(u_len[b])
        # alpha at the origin is 0; beta there and alpha + final blank at the end are log P.
        assert alpha[b, 0, 0] == 0.0
        assert beta[b, 0, 0] == pytest.approx(log_like[b], abs=1e-9 * max(1.0, -log_like[b]))
        end = alpha[b, t - 1, u] + as_numpy(state.blank_lp)[b, t - 1, u]
        assert end == pytest.approx(log_like[b], rel=1e-6)


def test_forward_state_names_a_bad_utterance(backend):
    x, y, t_len, u_len = random_batch(3, 3, 2, 5, seed=22, mixed=False)
    x[2, 1, 1, 4] = float("inf")
    state = load_engine(backend).forward(x, y, t_len, u_len, LossOptions(blank=0), False)
    assert as_numpy(state.bad).tolist() == [False, False, True]
    log_like = as_numpy(state.log_like)
    assert np.isnan(log_like[2]) and np.isfinite(log_like[:2]).all()


# --------------------------------------------------------------------------- lattice terms
def reference_p2_others(x, y, T, U, blank, fused=True):
    """float64, obvious: log of the sum of p_v**2 over v not blank, not y_{u+1}
    ``(T, U+1)`` of one utterance's ``(T, U+1, V)`` logits (log-probs without ``fused``)."""
    lp = x[:T, : U + 1].double()
    if fused:
        lp = torch.log_softmax(lp, dim=-1)
    p2 = torch.exp(2 * lp)
    p2[..., blank] = 0.0
    for u in range(U):
        p2[:, u, int(y[u])] = 0.0
    return torch.log(p2.sum(-1)).numpy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fused", [True, False])
def test_lattice_terms_of_each_backend(backend, dtype, fused):
    """``lattice_terms``: the forward's two log-probs bit for bit, and the sum of the
    other squared probabilities as the float64 reference has it; ``forward_compact``
    on them gives the forward's log P bit for bit, state and all."""
    B, T, U, V, blank = 3, 5, 3, 37, 2  # V > 16 lanes, not a multiple of them
    x, y, t_len, u_len = random_batch(B, T, U, V, blank=blank, seed=31, dtype=dtype, scale=4.0)
    if not fused:
        x = torch.log_softmax(x.double(), -1).to(dtype)
    yv = y.clamp(min=0)
    eng, opts = load_engine(backend), LossOptions(blank=blank, fused=fused)
    terms = eng.lattice_terms(x, yv, t_len, u_len, opts)
    assert isinstance(terms, LatticeTerms)
    state = eng.forward(x, yv, t_len, u_len, opts, True)
    lat = np.float64 if dtype == torch.float64 else np.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for name in ("blank_lp", "emit_lp", "log_p2_others"):
        assert as_numpy(getattr(terms, name)).shape == (B, T, U + 1)
        assert as_numpy(getattr(terms, name)).dtype == lat
    for b in range(B):
        Tb, Ub = int(t_len[b]), int(u_len[b])
        for name in ("blank_lp", "emit_lp"):
            np.testing.assert_array_equal(as_numpy(getattr(terms, name))[b, :Tb, : Ub + 1],
                                          as_numpy(getattr(state, name))[b, :Tb, : Ub + 1])
        p2 = as_numpy(terms.log_p2_others)[b]
        want = reference_p2_others(x[b], yv[b], Tb, Ub, blank, fused)
        np.testing.assert_allclose(p2[:Tb, : Ub + 1], want, rtol=tol, atol=tol)
        outside = np.ones((T, U + 1), bool)
        outside[:Tb, : Ub + 1] = False
        assert (p2[outside] == -np.inf).all()
    assert not as_numpy(terms.bad).any()
    compact = eng.forward_compact(terms.blank_lp, terms.emit_lp, yv, t_len, u_len, True)
    np.testing.assert_array_equal(as_numpy(compact.log_like), as_numpy(state.log_like))
    for name in ("alpha", "beta"):  # (CUDA leaves nodes outside the lengths unwritten)
        for b in range(B):
            Tb, Ub = int(t_len[b]), int(u_len[b])
            np.testing.assert_array_equal(as_numpy(getattr(compact, name))[b, :Tb, : Ub + 1],
                                          as_numpy(getattr(state, name))[b, :Tb, : Ub + 1],
                                          err_msg=name)
    assert compact.lse is None
    best, path = eng.best_path(compact)
    best2, path2 = eng.best_path(state)
    np.testing.assert_array_equal(as_numpy(best), as_numpy(best2))
    np.testing.assert_array_equal(as_numpy(path), as_numpy(path2))


def test_lattice_terms_of_a_peaked_row_keep_the_small_sum(backend):
    """A trained model's row: blank and the next label hold nearly all the mass. The
    others' sum (here about 1e-19) is summed on its own, not left as the difference
    of two numbers near 1, so it keeps float32's relative precision."""
    V = 40
    x = torch.full((1, 1, 2, V), -14.0)
    x[0, 0, :, 0] = 10.0  # blank
    x[0, 0, 0, 5] = 9.0  # y_1
    y = torch.tensor([[5]])
    terms = load_engine(backend).lattice_terms(x, y, torch.tensor([1]), torch.tensor([1]),
                                               LossOptions(blank=0))
    want = reference_p2_others(x[0], y[0], 1, 1, 0)
    np.testing.assert_allclose(as_numpy(terms.log_p2_others)[0], want, rtol=2e-6)
    assert want[0, 0] < np.log(1e-18)


def test_lattice_terms_mark_a_bad_utterance_and_a_row_with_no_other_mass(backend):
    x, y, t_len, u_len = random_batch(2, 3, 1, 2, seed=32, mixed=False)  # V = 2
    x[1, 2, 0, 0] = float("nan")
    terms = load_engine(backend).lattice_terms(x, y, t_len, u_len, LossOptions(blank=0))
    assert as_numpy(terms.bad).tolist() == [False, True]
    p2 = as_numpy(terms.log_p2_others)
    # u = 0: blank and y_1 are the only tokens, nothing else has mass; u = U: one other.
    assert (p2[0, :, 0] == -np.inf).all() and np.isfinite(p2[0, :, 1]).all()
    assert np.isnan(p2[1, 2, 0]) and np.isnan(as_numpy(terms.blank_lp)[1, 2, 0])


def test_cpu_and_cuda_lattice_terms_agree():
    """The same logits give the same compact arrays on both backends: blank and
    next-label log-probs within a float32 rounding or two (the sums over V run in a
    different order), and hence the same losses to float32 precision."""
    from rnntool import cuda

    if not cuda.SIMULATOR:
        pytest.skip("compares with the CUDA kernels in Numba's simulator")
    from helpers import SMALL_LAUNCHES

    x, y, t_len, u_len = random_batch(3, 6, 4, 45, seed=33, scale=3.0)
    yv, opts = y.clamp(min=0), LossOptions(blank=0)
    cpu_terms = load_engine("cpu").lattice_terms(x, yv, t_len, u_len, opts)
    with cuda.config(**SMALL_LAUNCHES):
        cuda_terms = load_engine("cuda").lattice_terms(x, yv, t_len, u_len, opts)
    for name in ("blank_lp", "emit_lp", "log_p2_others"):
        np.testing.assert_allclose(as_numpy(getattr(cuda_terms, name)),
                                   as_numpy(getattr(cpu_terms, name)), rtol=1e-6, atol=1e-6,
                                   err_msg=name)


# --------------------------------------------------------------------------- Engine
def test_backward_scales_each_utterance(backend):
    """``backward``'s gradient of utterance b is the reference's times ``scale[b]``;
    a zero scale gives zeros."""
    x, y, t_len, u_len = random_batch(3, 4, 2, 5, seed=23)
    eng, opts = load_engine(backend), LossOptions(blank=0)
    state = eng.forward(x, y, t_len, u_len, opts, True)
    scale = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    grad = eng.backward(x, state, opts, scale)
    assert grad.shape == x.shape and grad.dtype == x.dtype and grad.is_contiguous()
    _, ref = reference_gradients(x.double(), y, t_len, u_len)
    torch.testing.assert_close(grad.double(), ref * scale.view(3, 1, 1, 1), atol=2e-6,
                               rtol=1e-4)
    assert float(grad[2].abs().max()) == 0.0 and float(grad[1].abs().max()) > 0


def test_best_path_of_a_kept_state(backend):
    x, y, t_len, u_len = random_batch(2, 4, 2, 5, seed=24, mixed=False)
    eng = load_engine(backend)
    state = eng.forward(x, y, t_len, u_len, LossOptions(blank=0), True)
    best, from_emit = (as_numpy(a) for a in eng.best_path(state))
    assert best.shape == (2,) and best.dtype == np.float64
    assert from_emit.shape == (2, 4, 3)
    # The best path is one alignment: no better than all of them together.
    assert (best <= as_numpy(state.log_like) + 1e-9).all() and np.isfinite(best).all()
    # A node at u = 0 is entered by blank only, one at t = 0 (u > 0) by emission only.
    assert not from_emit[:, :, 0].any() and from_emit[:, 0, 1:].all()


def test_engines_table_and_load_engine():
    assert set(ENGINES) == {"cpu", "cuda"}
    assert ("auto", *ENGINES) == rnntool.loss.BACKENDS
    for name, module in ENGINES.items():
        eng = load_engine(name)
        assert eng is importlib.import_module(module).ENGINE
        assert isinstance(eng, Engine) and eng.name == name
        for f in ("check_device", "forward", "backward", "best_path"):
            assert callable(getattr(eng, f)), (name, f)
    # Only CUDA's kernels survive unchecked labels and lengths (NaN, not a bad read).
    assert (load_engine("cpu").guards_indices, load_engine("cuda").guards_indices) == (
        False, True)
    with pytest.raises(KeyError):
        load_engine("tpu")


def test_the_contract_and_the_cpu_forward_are_torch_free():
    # The dispatch table and the CPU forward on numpy arrays need no torch (rnntool
    # score); the contract module needs neither numba nor numpy.
    code = (
        "import sys\n"
        "import rnntool.engine\n"
        "print(*(m in sys.modules for m in ('torch', 'numba', 'numpy')))\n"
        "import numpy as np\n"
        "from rnntool.engine import LossOptions, load_engine\n"
        "x = np.zeros((1, 2, 2, 3), np.float32); y = np.array([[1]]); n = np.array([2]); "
        "u = np.array([1])\n"
        "s = load_engine('cpu').forward(x, y, n, u, LossOptions(blank=0), False)\n"
        "print(type(s.log_like).__name__, np.isfinite(s.log_like).all(), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False", "False", "ndarray", "True", "False"], out.stderr


def test_cpu_check_device_refuses_other_devices():
    # (CUDA's, outside the simulator: test_cuda.py's test_backend_cuda_refuses_what_it_cannot_run.)
    x = torch.zeros(1, 2, 2, 3)
    load_engine("cpu").check_device(x)
    with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors; logits are on meta"):
        load_engine("cpu").check_device(x.to("meta"))


# --------------------------------------------------------------------------- the warning
def test_impossible_loss_warning_carries_reason_and_utterances():
    w = ImpossibleLossWarning("rnnt_loss: something", "negative", [3, 1])
    assert isinstance(w, RuntimeWarning)
    assert (str(w), w.reason, w.utterances) == ("rnnt_loss: something", "negative", (3, 1))
    assert type(w.utterances) is tuple  # any iterable in, a tuple out
    bare = ImpossibleLossWarning("rnnt_loss: x")
    assert (bare.reason, bare.utterances) == ("", ())


@pytest.mark.parametrize("reason,utterances", [("nan", (0,)), ("inf", (2, 5)), ("", ())])
def test_impossible_loss_warning_pickles_and_copies(reason, utterances):
    # Warnings cross process boundaries (DataLoader workers, pools): all of it survives.
    w = ImpossibleLossWarning(f"rnnt_loss: {reason}", reason, utterances)
    for again in (pickle.loads(pickle.dumps(w)), copy.copy(w), copy.deepcopy(w)):
        assert type(again) is ImpossibleLossWarning
        assert (str(again), again.reason, again.utterances) == (str(w), reason, utterances)


def test_impossible_loss_warning_is_one_class_everywhere():
    assert rnntool.ImpossibleLossWarning is ImpossibleLossWarning
    assert rnntool.loss.ImpossibleLossWarning is ImpossibleLossWarning
    assert engine_module.ImpossibleLossWarning is ImpossibleLossWarning


def test_impossible_loss_warning_filters_by_class():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ImpossibleLossWarning)
        warnings.warn(ImpossibleLossWarning("rnnt_loss: hidden", "nan", (0,)), stacklevel=1)
        warnings.warn("rnnt_loss: shown", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["rnnt_loss: shown"]

