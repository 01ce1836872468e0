"""Bad input: one clear error naming the utterance and the values, never a crash; what is
accepted. On every backend (the `backend` fixture): the checks come before the kernels,
and must not depend on which kernels would run.
"""

import numpy as np
import pytest
import torch
from helpers import random_batch, reference_loss_and_grad

from rnntool import TransducerLoss, align, rnnt_loss
from rnntool.loss import check_devices


def batch():
    return random_batch(3, 5, 3, 6, seed=1, mixed=False)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, y, T, U: y.__setitem__((1, 2), 6), r"utterance 1: targets\[1, 2\] = 6 is outside \[0, 6\)"),
        (lambda x, y, T, U: y.__setitem__((2, 0), -3), r"utterance 2: targets\[2, 0\] = -3"),
        (lambda x, y, T, U: y.__setitem__((0, 1), 0), r"utterance 0: targets\[0, 1\] = 0 equals blank"),
        (lambda x, y, T, U: T.__setitem__(2, 0), r"utterance 2: logit_lengths\[2\] = 0"),
        (lambda x, y, T, U: T.__setitem__(1, -1), r"utterance 1: logit_lengths\[1\] = -1 is negative"),
        (lambda x, y, T, U: U.__setitem__(0, -2), r"utterance 0: target_lengths\[0\] = -2 is negative"),
        (lambda x, y, T, U: T.__setitem__(1, 6), r"utterance 1: logit_lengths\[1\] = 6 exceeds the logits' T dim 5"),
        (lambda x, y, T, U: U.__setitem__(2, 4), r"utterance 2: target_lengths\[2\] = 4 needs U\+1 = 5"),
    ],
)
def test_bad_values(mutate, match, backend):
    x, y, T, U = batch()
    mutate(x, y, T, U)
    with pytest.raises(ValueError, match=match):
        rnnt_loss(x, y, T, U, blank=0, backend=backend)


def test_label_past_its_length_is_ignored(backend):
    x, y, T, U = batch()
    U[1] = 1
    want = rnnt_loss(x, y, T, U, blank=0, reduction="none", backend=backend)
    y[1, 1:] = 99  # padding, never read
    assert torch.equal(rnnt_loss(x, y, T, U, blank=0, reduction="none", backend=backend), want)


def test_targets_shorter_than_length(backend):
    x, y, T, U = batch()
    with pytest.raises(ValueError, match=r"target_lengths\[0\] = 3 exceeds targets' dim 2"):
        rnnt_loss(x, y[:, :2], T, U, blank=0, backend=backend)


def test_batch_sizes_disagree(backend):
    x, y, T, U = batch()
    with pytest.raises(ValueError, match="batch sizes disagree: logits has 3, targets has 2"):
        rnnt_loss(x, y[:2], T, U, blank=0, backend=backend)
    with pytest.raises(ValueError, match="target_lengths has 2"):
        rnnt_loss(x, y, T, U[:2], blank=0, backend=backend)


@pytest.mark.parametrize("blank", [6, -7, 100])
def test_blank_out_of_range(blank, backend):
    x, y, T, U = batch()
    with pytest.raises(ValueError, match=rf"blank={blank} is outside \[-V, V\) for V=6"):
        rnnt_loss(x, y, T, U, blank=blank, backend=backend)


def test_blank_negative_counts_from_end(backend):
    x, y, T, U = random_batch(2, 4, 2, 6, blank=5, seed=3)
    torch.testing.assert_close(rnnt_loss(x, y, T, U, blank=-1, backend=backend),
                               rnnt_loss(x, y, T, U, blank=5, backend=backend))


# --------------------------------------------------------------------------- every argument
# One row per kind of bad argument: (id, changes, exception, message fragment). `changes`
# maps an argument's name to its bad value, or to a function of the good batch
# `(x, y, T, U)` giving it. The same table runs against rnnt_loss, TransducerLoss
# (options in the constructor, tensors in forward) and align (the arguments it has).
TENSORS = ("logits", "targets", "logit_lengths", "target_lengths")
ALIGN_OPTIONS = ("blank", "fused_log_softmax", "backend")


def _sparse_csr(t):
    return t.to_sparse_csr()


def _qint(t):
    return torch.quantize_per_tensor(t.float(), 1.0, 0, torch.qint32)


def _nested(x):
    return torch.nested.nested_tensor(list(x.unbind(0)))


NAN = float("nan")
BAD = [
    # tensors: type, layout, device, dtype, dims
    ("logits numpy", {"logits": lambda x, y, T, U: x.numpy()}, TypeError,
     "logits must be a torch.Tensor, got ndarray"),
    ("targets list", {"targets": lambda x, y, T, U: y.tolist()}, TypeError,
     "targets must be a torch.Tensor, got list"),
    ("lengths list", {"logit_lengths": [5, 5, 5]}, TypeError,
     "logit_lengths must be a torch.Tensor, got list"),
    ("lengths int", {"target_lengths": 3}, TypeError,
     "target_lengths must be a torch.Tensor, got int"),
    ("logits meta", {"logits": lambda x, y, T, U: x.to("meta")}, TypeError,
     r"logits must be on the CPU or a CUDA device, got a torch.float32 tensor of shape "
     r"\(3, 5, 4, 6\) on meta"),
    ("targets meta", {"targets": lambda x, y, T, U: y.to("meta")}, TypeError,
     "targets must be on the CPU or a CUDA device, got .* on meta"),
    ("logit_lengths meta", {"logit_lengths": lambda x, y, T, U: T.to("meta")}, TypeError,
     "logit_lengths must be on the CPU or a CUDA device, got .* on meta"),
    ("target_lengths meta", {"target_lengths": lambda x, y, T, U: U.to("meta")}, TypeError,
     "target_lengths must be on the CPU or a CUDA device, got .* on meta"),
    ("logits sparse", {"logits": lambda x, y, T, U: x.to_sparse()}, TypeError,
     r"logits must be a dense \(strided\) tensor, got a sparse_coo torch.float32 tensor"),
    ("targets sparse csr", {"targets": lambda x, y, T, U: _sparse_csr(y)}, TypeError,
     r"targets must be a dense \(strided\) tensor, got a sparse_csr"),
    ("lengths sparse", {"logit_lengths": lambda x, y, T, U: T.to_sparse()}, TypeError,
     r"logit_lengths must be a dense \(strided\) tensor"),
    ("logits nested", {"logits": lambda x, y, T, U: _nested(x)}, TypeError,
     "logits must be a dense tensor, got a nested torch.float32 tensor"),
    ("logits complex", {"logits": lambda x, y, T, U: x.to(torch.complex64)}, TypeError,
     "logits must be float16, bfloat16, float32 or float64, got torch.complex64"),
    ("logits conj view", {"logits": lambda x, y, T, U: x.to(torch.complex128).conj()},
     TypeError, "got torch.complex128"),
    ("logits quantized", {"logits": lambda x, y, T, U: torch.quantize_per_tensor(
        x, 0.1, 0, torch.qint8)}, TypeError, "got torch.qint8"),
    ("logits int", {"logits": lambda x, y, T, U: x.long()}, TypeError,
     "logits must be float16, bfloat16, float32 or float64, got torch.int64"),
    ("logits bool", {"logits": lambda x, y, T, U: x > 0}, TypeError, "got torch.bool"),
    ("lengths quantized", {"target_lengths": lambda x, y, T, U: _qint(U)}, TypeError,
     "target_lengths must have an integer dtype, got torch.qint32"),
    ("lengths bool", {"logit_lengths": lambda x, y, T, U: T.bool()}, TypeError,
     "logit_lengths must have an integer dtype, got torch.bool"),
    ("lengths float", {"target_lengths": lambda x, y, T, U: U.double()}, TypeError,
     "target_lengths must have an integer dtype, got torch.float64"),
    ("logit_lengths float", {"logit_lengths": lambda x, y, T, U: T.float()}, TypeError,
     "logit_lengths must have an integer dtype, got torch.float32"),
    ("targets float", {"targets": lambda x, y, T, U: y.float()}, TypeError,
     "targets must have an integer dtype, got torch.float32"),
    ("targets complex", {"targets": lambda x, y, T, U: y.to(torch.complex64)}, TypeError,
     "targets must have an integer dtype, got torch.complex64"),
    ("lengths 0-d", {"logit_lengths": torch.tensor(5)}, ValueError,
     r"logit_lengths must have 1 dims, got shape \(\)"),
    ("logits 0-d", {"logits": torch.tensor(1.0)}, ValueError,
     r"logits must have 4 dims \(B, T, U\+1, V\), got shape \(\)"),
    ("logits 3 dims", {"logits": lambda x, y, T, U: x[0]}, ValueError,
     r"logits must have 4 dims \(B, T, U\+1, V\), got shape \(5, 4, 6\)"),
    ("targets 1 dim", {"targets": lambda x, y, T, U: y[0]}, ValueError,
     r"targets must have 2 dims, got shape \(3,\)"),
    ("lengths 2 dims", {"target_lengths": lambda x, y, T, U: U[None]}, ValueError,
     r"target_lengths must have 1 dims, got shape \(1, 3\)"),
    # blank
    ("blank True", {"blank": True}, TypeError, "blank must be an integer, got True"),
    ("blank numpy bool", {"blank": np.bool_(False)}, TypeError, "blank must be an integer"),
    ("blank float", {"blank": 0.0}, TypeError, "blank must be an integer, got 0.0"),
    ("blank str", {"blank": "0"}, TypeError, "blank must be an integer, got '0'"),
    ("blank None", {"blank": None}, TypeError, "blank must be an integer, got None"),
    ("blank 1-d tensor", {"blank": torch.tensor([0])}, TypeError,
     r"blank must be an integer \(a 0-d CPU or CUDA tensor at most\), got a torch.int64 "
     r"tensor of shape \(1,\)"),
    ("blank bool tensor", {"blank": torch.tensor(False)}, TypeError,
     "blank must be an integer, got a torch.bool tensor"),
    ("blank meta tensor", {"blank": torch.tensor(0, device="meta")}, TypeError,
     "blank must be an integer .* on meta"),
    ("blank 1-d array", {"blank": np.array([0])}, TypeError,
     r"blank must be an integer \(a 0-d array at most\)"),
    ("blank out of range", {"blank": 6}, ValueError, r"blank=6 is outside \[-V, V\) for V=6"),
    # reduction and backend
    ("reduction int", {"reduction": 1}, TypeError,
     "reduction must be a str, one of none, sum, mean, mean_frames, mean_tokens; got 1"),
    ("reduction None", {"reduction": None}, TypeError, "reduction must be a str"),
    ("reduction list", {"reduction": ["sum"]}, TypeError,
     r"reduction must be a str.*got \['sum'\]"),
    ("reduction unknown", {"reduction": "avg"}, ValueError,
     "reduction must be one of none, sum, mean, mean_frames, mean_tokens; got 'avg'"),
    ("backend None", {"backend": None}, TypeError,
     "backend must be a str, one of auto, cpu, cuda; got None"),
    ("backend device", {"backend": torch.device("cpu")}, TypeError, "backend must be a str"),
    ("backend unknown", {"backend": "gpu"}, ValueError,
     "backend must be one of auto, cpu, cuda; got 'gpu'"),
    # flags: truthiness is not enough
    ("fused str", {"fused_log_softmax": "no"}, TypeError,
     "fused_log_softmax must be True or False, got 'no'"),
    ("fused int", {"fused_log_softmax": 1}, TypeError,
     "fused_log_softmax must be True or False, got 1"),
    ("fused None", {"fused_log_softmax": None}, TypeError,
     "fused_log_softmax must be True or False, got None"),
    ("fused tensor", {"fused_log_softmax": torch.tensor(True)}, TypeError,
     "fused_log_softmax must be True or False, got a torch.bool tensor"),
    ("validate str", {"validate": "yes"}, TypeError,
     "validate must be True, False or None, got 'yes'"),
    ("validate int", {"validate": 0}, TypeError, "validate must be True, False or None, got 0"),
    # clamp
    ("clamp nan", {"clamp": NAN}, ValueError, "clamp must be None or a number, got nan"),
    ("clamp numpy nan", {"clamp": np.float32("nan")}, ValueError, "clamp .* got nan"),
    ("clamp tensor nan", {"clamp": torch.tensor(NAN)}, ValueError, "clamp .* got nan"),
    ("clamp str", {"clamp": "1"}, TypeError, "clamp must be a real number, got '1'"),
    ("clamp bool", {"clamp": True}, TypeError, "clamp must be a real number, got True"),
    ("clamp complex", {"clamp": 1j}, TypeError, "clamp must be a real number, got 1j"),
    ("clamp 2 elements", {"clamp": torch.tensor([0.1, 0.2])}, TypeError,
     r"clamp must be a real number \(a 0-d CPU or CUDA tensor at most\), got a torch.float32 "
     r"tensor of shape \(2,\)"),
    ("clamp bool tensor", {"clamp": torch.tensor(True)}, TypeError,
     "clamp must be a real number, got a torch.bool tensor"),
    # fastemit_lambda
    ("lambda nan", {"fastemit_lambda": NAN}, ValueError,
     "fastemit_lambda must be a finite number >= 0, got nan"),
    ("lambda inf", {"fastemit_lambda": float("inf")}, ValueError,
     "fastemit_lambda must be a finite number >= 0, got inf"),
    ("lambda negative", {"fastemit_lambda": -0.1}, ValueError,
     "fastemit_lambda must be a finite number >= 0, got -0.1"),
    ("lambda numpy nan", {"fastemit_lambda": np.float64("nan")}, ValueError, "got nan"),
    ("lambda str", {"fastemit_lambda": "0.1"}, TypeError,
     "fastemit_lambda must be a real number, got '0.1'"),
    ("lambda bool", {"fastemit_lambda": True}, TypeError,
     "fastemit_lambda must be a real number, got True"),
    ("lambda None", {"fastemit_lambda": None}, TypeError,
     "fastemit_lambda must be a real number, got None"),
    ("lambda 2 elements", {"fastemit_lambda": np.array([0.1, 0.2])}, TypeError,
     r"fastemit_lambda must be a real number \(a 0-d array at most\)"),
]


def _apply(changes, backend):
    """The good batch with ``changes``: (tensors, options), the options on ``backend``
    unless ``changes`` names one."""
    x, y, T, U = batch()
    args = dict(zip(TENSORS, (x, y, T, U), strict=True))
    for name, value in changes.items():
        args[name] = value(x, y, T, U) if callable(value) else value
    return [args.pop(n) for n in TENSORS], {"backend": backend, "blank": 0, **args}


def _params(api):
    return [
        pytest.param(changes, exc, match, id=name) for name, changes, exc, match in BAD
        if api != "align" or set(changes) <= set(TENSORS + ALIGN_OPTIONS)
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested/quantized tensors' prototype notes
@pytest.mark.parametrize("changes, exc, match", _params("rnnt_loss"))
def test_rnnt_loss_refuses(changes, exc, match, backend):
    tensors, options = _apply(changes, backend)
    with pytest.raises(exc, match=match):
        rnnt_loss(*tensors, **options)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("changes, exc, match", _params("TransducerLoss"))
def test_transducer_loss_refuses(changes, exc, match, backend):
    tensors, options = _apply(changes, backend)
    if set(changes) - set(TENSORS) - {"blank"} or ("blank" in changes and exc is TypeError):
        # An option's type or value (blank's range aside, which needs V): the
        # constructor itself refuses it.
        with pytest.raises(exc, match=match):
            TransducerLoss(**options)
    else:
        criterion = TransducerLoss(**options)
        with pytest.raises(exc, match=match):
            criterion(*tensors)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("changes, exc, match", _params("align"))
def test_align_refuses(changes, exc, match, backend):
    tensors, options = _apply(changes, backend)
    with pytest.raises(exc, match=match):
        align(*tensors, **options)


def test_torch_func_transforms_are_refused(backend):
    x, y, T, U = batch()
    with pytest.raises(TypeError, match="logits is a tensor inside a torch.func transform"):
        torch.func.grad(lambda z: rnnt_loss(z, y, T, U, blank=0, backend=backend))(x)
    with pytest.raises(TypeError, match="logits is a tensor inside a torch.func transform"):
        torch.vmap(lambda z: rnnt_loss(z[None], y[:1], T[:1], U[:1], blank=0, backend=backend))(x)


def test_index_tensors_on_the_cpu_or_the_logits_device():
    # Only CPU tensors exist here: check_devices takes the devices themselves, as
    # check_meta hands them over, so the GPU cases are tested without a GPU.
    cpu, gpu0, gpu1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)
    check_devices(gpu0, targets=cpu, logit_lengths=gpu0, target_lengths=cpu)  # fine
    check_devices(cpu, targets=cpu, logit_lengths=cpu, target_lengths=cpu)
    with pytest.raises(ValueError, match="targets is on cuda:1 but logits are on cuda:0"):
        check_devices(gpu0, targets=gpu1, logit_lengths=cpu, target_lengths=cpu)
    with pytest.raises(ValueError, match="target_lengths is on cuda:0 but logits are on cpu"):
        check_devices(cpu, targets=cpu, logit_lengths=cpu, target_lengths=gpu0)


# --------------------------------------------------------------------------- what is accepted
def _reference_args(backend):
    x, y, T, U = batch()
    return x, y, T, U, rnnt_loss(x, y, T, U, blank=0, reduction="none", backend=backend)


@pytest.mark.parametrize("blank", [0, np.int64(0), np.int8(0), torch.tensor(0), np.array(0),
                                   torch.tensor(-6, dtype=torch.int16)])
def test_blank_types_accepted(blank, backend):
    x, y, T, U, want = _reference_args(backend)
    torch.testing.assert_close(rnnt_loss(x, y, T, U, blank=blank, reduction="none",
                                         backend=backend), want, rtol=0, atol=0)
    assert align(x, y, T, U, blank=blank, backend=backend)[1].loss == pytest.approx(
        float(want[1]), abs=0)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8,
                                   torch.uint16, torch.uint32, torch.uint64])
def test_index_dtypes_accepted(dtype, backend):
    x, y, T, U, want = _reference_args(backend)
    got = rnnt_loss(x, y.to(dtype), T.to(dtype), U.to(dtype), blank=0, reduction="none",
                    backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("clamp", [None, 0, -1.0, float("-inf"), float("inf"), np.float32(0)])
def test_clamp_off(clamp, backend):
    x, y, T, U = random_batch(3, 5, 3, 6, seed=4, scale=3.0)
    _, want = reference_loss_and_grad(x.double(), y, T, U)
    xg = x.clone().requires_grad_(True)
    rnnt_loss(xg, y, T, U, blank=0, clamp=clamp, reduction="sum", backend=backend).backward()
    assert float(want.abs().max()) > 0.5  # clamping at 0.5 would show
    torch.testing.assert_close(xg.grad.double(), want, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("clamp", [0.1, np.float64(0.1), torch.tensor(0.1, dtype=torch.float64),
                                   np.array(0.1), 1e-1])
def test_clamp_number_types(clamp, backend):
    x, y, T, U = random_batch(3, 5, 3, 6, seed=4, scale=3.0)
    _, want = reference_loss_and_grad(x.double(), y, T, U, clamp=0.1)
    xg = x.clone().requires_grad_(True)
    rnnt_loss(xg, y, T, U, blank=0, clamp=clamp, reduction="sum", backend=backend).backward()
    torch.testing.assert_close(xg.grad.double(), want, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("lam", [0.5, np.float32(0.5), torch.tensor(0.5), np.array(0.5)])
def test_fastemit_lambda_number_types(lam, backend):
    x, y, T, U = random_batch(3, 5, 3, 6, seed=6)
    _, want = reference_loss_and_grad(x.double(), y, T, U, fastemit_lambda=0.5)
    xg = x.clone().requires_grad_(True)
    rnnt_loss(xg, y, T, U, blank=0, fastemit_lambda=lam, reduction="sum",
              backend=backend).backward()
    torch.testing.assert_close(xg.grad.double(), want, atol=2e-6, rtol=1e-4)


def test_numpy_bools_and_transducer_loss_options_accepted(backend):
    x, y, T, U, want = _reference_args(backend)
    logp = torch.log_softmax(x, -1)
    got = rnnt_loss(logp, y, T, U, blank=0, fused_log_softmax=np.bool_(False),
                    validate=np.bool_(True), reduction="none", backend=backend)
    torch.testing.assert_close(got, want)
    criterion = TransducerLoss(np.int64(0), "none", fused_log_softmax=True, clamp=np.float32(1),
                               fastemit_lambda=0, backend=backend, validate=None)
    # SpeechBrain's values: each utterance's loss per frame.
    torch.testing.assert_close(criterion(x, y, T, U), want / T, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- unusual views
def test_negative_view_logits(backend):
    """A negative-bit view (torch._neg_view: what x.neg() is made of under some
    transforms) cannot be read by numpy or the CUDA array interface; rnnt_loss
    materialises it and the gradient reaches the view's base negated."""
    x0, y, T, U = random_batch(3, 5, 3, 6, seed=8)
    want, want_grad = reference_loss_and_grad(-x0.double(), y, T, U, reduction="sum")
    plain = rnnt_loss(-x0, y, T, U, blank=0, reduction="sum", backend=backend)
    # The view as the leaf.
    v = torch._neg_view(x0).requires_grad_(True)
    assert v.is_neg()
    loss = rnnt_loss(v, y, T, U, blank=0, reduction="sum", backend=backend)
    loss.backward()
    assert torch.equal(loss, plain)  # the same bits as the materialised -x0
    torch.testing.assert_close(loss.double(), want, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(v.grad.double(), want_grad, atol=2e-6, rtol=1e-4)
    # The view of a leaf: its gradient is the negation.
    x = x0.clone().requires_grad_(True)
    rnnt_loss(torch._neg_view(x), y, T, U, blank=0, reduction="sum", backend=backend).backward()
    torch.testing.assert_close(x.grad.double(), -want_grad, atol=2e-6, rtol=1e-4)
    # Negative-bit index tensors read as their values.
    neg = torch._neg_view
    got = rnnt_loss(-x0, neg(-y), neg(-T), neg(-U), blank=0, reduction="sum", backend=backend)
    assert torch.equal(got, plain)


def test_negative_view_align(backend):
    x0, y, T, U = random_batch(2, 5, 3, 6, seed=9)
    got = align(torch._neg_view(x0), y, T, U, backend=backend)
    want = align(-x0, y, T, U, backend=backend)
    for g, w in zip(got, want, strict=True):
        assert g.loss == w.loss and g.frames.tolist() == w.frames.tolist()
        np.testing.assert_array_equal(g.occupancy, w.occupancy)


def test_conjugate_view_of_real_logits_is_the_tensor(backend):
    # x.conj() of a real tensor is x itself (no conjugate bit); a conjugate bit needs
    # a complex dtype, which the dtype check refuses (see BAD).
    x, y, T, U, want = _reference_args(backend)
    assert not x.conj().is_conj()
    torch.testing.assert_close(rnnt_loss(x.conj(), y, T, U, blank=0, reduction="none",
                                         backend=backend),
                               want, rtol=0, atol=0)


EXPANSIONS = {
    "batch": lambda b: b[:1].expand(3, -1, -1, -1),
    "frames": lambda b: b[:, :1].expand(-1, 5, -1, -1),
    "labels": lambda b: b[:, :, 1:2].expand(-1, -1, 4, -1),
    "vocab": lambda b: b[..., 2:3].expand(-1, -1, -1, 6),
    "all": lambda b: b[0, 0, 0, 0].expand(3, 5, 4, 6),
}


@pytest.mark.parametrize("dims", list(EXPANSIONS))
def test_expanded_logits(backend, dims):
    """Stride-0 dims (x.expand) read each shared element for every index: the loss
    and gradient of the materialised copy, and the reference's."""
    base, y, T, U = random_batch(3, 5, 3, 6, seed=10, mixed=False)
    T[1], U[2] = 3, 1
    x = EXPANSIONS[dims](base).requires_grad_(True)
    assert 0 in x.stride()
    dense = x.detach().contiguous().requires_grad_(True)
    loss = rnnt_loss(x, y, T, U, blank=0, reduction="none", backend=backend)
    loss_dense = rnnt_loss(dense, y, T, U, blank=0, reduction="none", backend=backend)
    go = torch.tensor([0.5, 1.0, 2.0])
    loss.backward(go)
    loss_dense.backward(go)
    assert torch.equal(loss, loss_dense)
    assert torch.equal(x.grad, dense.grad)
    want, want_grad = reference_loss_and_grad(dense.detach().double(), y, T, U, grad_output=go)
    torch.testing.assert_close(loss.double(), want, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=2e-6, rtol=1e-4)
