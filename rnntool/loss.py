"""The torch-facing loss: ``rnnt_loss``, ``RNNTLoss``, ``TransducerLoss``, validation, dispatch.

The engine's stages live in ``cpu.py`` and ``cuda.py``, behind the ``Engine``
contract of ``engine.py``; this module checks the inputs, picks the engine,
applies the reduction, and wires stage 3 into ``backward()`` so that nothing of
size ``B*T*U*V`` exists before it.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import NamedTuple

import numpy as np
import torch

from .checks import bad_label, check_blank, first_length_fault
from .engine import ENGINES, Engine, ForwardState, ImpossibleLossWarning, LossOptions, load_engine
from .lattice import negative_loss_tolerance

REDUCTIONS = ("none", "sum", "mean", "mean_frames", "mean_tokens")
BACKENDS = ("auto", *ENGINES)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation
# Integer dtypes the index tensors may have (torch's unsigned 16/32/64-bit types exist
# from torch 2.3 on); bool, float, complex and quantized dtypes are refused.
_INDEX_DTYPES = tuple(
    d for d in (
        torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8,
        getattr(torch, "uint16", None), getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
    ) if d is not None
)
_DEVICE_TYPES = ("cpu", "cuda")

try:  # torch.func's wrapped tensors (grad, vmap) have no storage the kernels could read
    from torch._C._functorch import is_functorch_wrapped_tensor as _is_functorch_wrapped
except ImportError:  # pragma: no cover - an older or newer torch without it
    def _is_functorch_wrapped(x) -> bool:
        return False


def _show(value) -> str:
    """``value`` for a one-line message: tensors and arrays by kind, others by a short repr."""
    if isinstance(value, torch.Tensor):
        if value.is_nested:
            return f"a nested {value.dtype} tensor on {value.device}"
        kind = "" if value.layout == torch.strided else f"{value.layout} ".removeprefix("torch.")
        return f"a {kind}{value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    if isinstance(value, np.ndarray):
        return f"a {value.dtype} numpy array of shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _check_tensor(name: str, x) -> None:
    """A dense (strided) torch.Tensor on the CPU or a CUDA device, else ``TypeError``.

    Refuses non-tensors (numpy arrays, lists), sparse, nested and mkldnn tensors,
    tensors on other devices (``meta``: no data; ``mps``, ...: no kernels) and
    ``torch.func`` (grad, vmap) wrappers.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(f"{name} must be a dense tensor, got {_show(x)}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got {_show(x)}")
    if x.device.type not in _DEVICE_TYPES:
        raise TypeError(f"{name} must be on the CPU or a CUDA device, got {_show(x)}")
    if _is_functorch_wrapped(x):
        raise TypeError(
            f"{name} is a tensor inside a torch.func transform (grad, vmap, ...), which "
            "the kernels cannot read; call rnnt_loss outside it"
        )


def _int_tensor(name: str, x, ndim: int) -> torch.Tensor:
    _check_tensor(name, x)
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    return x


def check_devices(logits_device: torch.device, **index_devices: torch.device) -> None:
    """``ValueError`` unless every index tensor is on the CPU or on the logits' own device.

    CPU targets and lengths go with CUDA logits (the value checks then need no
    host sync); CUDA ones with CPU logits, or on another GPU, are refused as
    torch refuses mixed devices.
    """
    for name, device in index_devices.items():
        if device.type != "cpu" and device != logits_device:
            raise ValueError(
                f"{name} is on {device} but logits are on {logits_device}: targets and "
                "lengths must be on the CPU or on the logits' device"
            )


def _scalar(name: str, value, what: str):
    """``value`` with a 0-d tensor or array, or a numpy scalar, as its Python scalar.

    A 0-d tensor must be dense and on the CPU or a CUDA device (a CUDA one is
    read with a host sync); anything with a shape is a ``TypeError``.
    """
    if isinstance(value, torch.Tensor):
        if (value.is_nested or value.layout != torch.strided
                or value.device.type not in _DEVICE_TYPES or value.dim() != 0):
            raise TypeError(
                f"{name} must be {what} (a 0-d CPU or CUDA tensor at most), got {_show(value)}"
            )
        return value.item()
    if isinstance(value, np.ndarray):
        if value.ndim != 0:
            raise TypeError(f"{name} must be {what} (a 0-d array at most), got {_show(value)}")
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def as_index(name: str, value) -> int:
    """``value`` as a Python int: ints, numpy integers and 0-d integer tensors/arrays.

    Raises ``TypeError`` for anything else (bools and floats included).
    """
    v = _scalar(name, value, "an integer")
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {_show(value)}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {_show(value)}") from None


def as_real(name: str, value) -> float:
    """``value`` as a Python float: real numbers (numpy's too) and 0-d real tensors/arrays.

    Raises ``TypeError`` for anything else (bools, strings, complex numbers included);
    NaN comes back as NaN, for the caller to refuse.
    """
    v = _scalar(name, value, "a real number")
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_show(value)}")
    return float(v)


def as_flag(name: str, value, *, allow_none: bool = False) -> bool | None:
    """``value`` as a bool: only ``True``/``False`` (numpy's too), and ``None`` if allowed.

    Truthiness is not enough: ``validate="no"`` would mean yes.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    allowed = "True, False or None" if allow_none else "True or False"
    raise TypeError(f"{name} must be {allowed}, got {_show(value)}")


def as_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``: ``TypeError`` for a non-str, ``ValueError`` else."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(choices)}; got {_show(value)}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return str(value)


def as_clamp(value) -> float:
    """``clamp`` as the kernels take it: ``c > 0`` clips to ``[-c, c]``, 0.0 is off.

    ``None``, numbers ``<= 0`` (``-inf`` too) and ``+inf`` mean no clipping; NaN
    is a ``ValueError`` (it would silently turn clipping off).
    """
    if value is None:
        return 0.0
    c = as_real("clamp", value)
    if math.isnan(c):
        raise ValueError(
            "clamp must be None or a number, got nan (None, <= 0 or inf: no clipping)"
        )
    return c if 0.0 < c < math.inf else 0.0


def as_fastemit_lambda(value) -> float:
    """``fastemit_lambda``: a finite number ``>= 0`` (a regularisation weight), else an error."""
    lam = as_real("fastemit_lambda", value)
    if not (0.0 <= lam < math.inf):
        raise ValueError(f"fastemit_lambda must be a finite number >= 0, got {lam!r}")
    return lam


class CallOptions(NamedTuple):
    """``rnnt_loss``'s keyword options, checked and normalised (see ``check_options``):
    those of the engine (``for_engine``) and those of the call (``backend``, ``validate``)."""

    reduction: str
    fused: bool
    clamp: float
    fastemit_lambda: float
    backend: str
    validate: bool | None

    def for_engine(self, blank: int) -> LossOptions:
        """The engine's ``LossOptions``, with ``blank`` in [0, V) (from ``check_meta``)."""
        return LossOptions(blank=blank, fused=self.fused, clamp=self.clamp,
                           fastemit_lambda=self.fastemit_lambda, reduction=self.reduction)


def check_options(
    reduction="mean", fused_log_softmax=True, clamp=None, fastemit_lambda=0.0,
    backend="auto", validate=None,
) -> CallOptions:
    """Check ``rnnt_loss``'s options (``blank`` aside: its range needs V); raise
    ``TypeError`` for a wrong type, ``ValueError`` for a wrong value."""
    return CallOptions(
        reduction=as_choice("reduction", reduction, REDUCTIONS),
        fused=as_flag("fused_log_softmax", fused_log_softmax),
        clamp=as_clamp(clamp),
        fastemit_lambda=as_fastemit_lambda(fastemit_lambda),
        backend=as_choice("backend", backend, BACKENDS),
        validate=as_flag("validate", validate, allow_none=True),
    )


def check_meta(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> int:
    """Check what needs no tensor values (types, devices, dims, batch, blank); return
    blank in [0, V).

    logits ``(B, T, U+1, V)``, targets ``(B, S)``, lengths ``(B,)``.
    """
    _check_tensor("logits", logits)
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}"
        )
    if logits.dim() != 4:
        raise ValueError(f"logits must have 4 dims (B, T, U+1, V), got shape {tuple(logits.shape)}")
    _int_tensor("targets", targets, 2)
    _int_tensor("logit_lengths", logit_lengths, 1)
    _int_tensor("target_lengths", target_lengths, 1)
    check_devices(logits.device, targets=targets.device, logit_lengths=logit_lengths.device,
                  target_lengths=target_lengths.device)
    B, T, U1, V = logits.shape
    sizes = {
        "logits": B, "targets": targets.shape[0],
        "logit_lengths": logit_lengths.shape[0], "target_lengths": target_lengths.shape[0],
    }
    if len(set(sizes.values())) != 1:
        raise ValueError(
            "batch sizes disagree: " + ", ".join(f"{k} has {v}" for k, v in sizes.items())
        )
    if V == 0:
        raise ValueError("logits has an empty vocabulary dim (V = 0)")
    return check_blank(as_index("blank", blank), V)


def resolve_logits(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` ready for the kernels: a negative-bit view (``torch._neg_view``,
    which numpy and the CUDA array interface cannot read) materialised through
    ``resolve_neg()``, the only case that copies; differentiable, so the gradient
    reaches the view's base. (A conjugate bit needs a complex dtype, refused.)"""
    return logits.resolve_neg() if logits.is_neg() else logits


def _index_values(x: torch.Tensor) -> torch.Tensor:
    """An index tensor as int64 on its own device, a negative-bit view resolved."""
    return x.detach().resolve_neg().to(torch.int64)


def check_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a batch fully; return ``(blank in [0, V), targets, logit_lengths,
    target_lengths)``, the index tensors as int64 CPU tensors.

    Raises ``TypeError``/``ValueError`` with one line naming the utterance and
    values. Reads the index tensors' values: a small device-to-host copy for CUDA ones.
    """
    blank = check_meta(logits, targets, logit_lengths, target_lengths, blank)
    _, T, U1, V = logits.shape
    logit_lengths, target_lengths, targets = (
        _index_values(x).cpu() for x in (logit_lengths, target_lengths, targets)
    )
    targets = targets.contiguous()
    S = targets.shape[1]

    fault = first_length_fault(logit_lengths.numpy(), target_lengths.numpy(), T, U1, S)
    if fault is not None:
        rule, b = fault
        t, u = int(logit_lengths[b]), int(target_lengths[b])
        raise ValueError(f"utterance {b}: " + {
            "T_negative": f"logit_lengths[{b}] = {t} is negative",
            "U_negative": f"target_lengths[{b}] = {u} is negative",
            "T_zero": f"logit_lengths[{b}] = 0, an utterance needs T >= 1",
            "T_over": f"logit_lengths[{b}] = {t} exceeds the logits' T dim {T}",
            "U_over": f"target_lengths[{b}] = {u} needs U+1 = {u + 1} but the logits' U+1 "
                      f"dim is {U1}",
            "U_over_labels": f"target_lengths[{b}] = {u} exceeds targets' dim {S}",
        }[rule])
    inside = np.arange(S)[None, :] < target_lengths.numpy()[:, None]
    bad = bad_label(targets.numpy(), V, blank, within=inside)
    if bad is not None:
        raise ValueError(f"utterance {bad.index[0]}: {bad.message('targets', show_v=True)}")
    return blank, targets, logit_lengths, target_lengths


def _check_reduction(reduction: str) -> None:
    as_choice("reduction", reduction, REDUCTIONS)


def reduction_weights(
    reduction: str, logit_lengths: torch.Tensor, target_lengths: torch.Tensor, *,
    per_frame: bool = False,
) -> torch.Tensor:
    """``(B,)`` float64 weights w with value = sum_b w_b * loss_b (``none``: w_b * loss_b).

    ``per_frame`` (``TransducerLoss``, SpeechBrain's values) divides ``none``,
    ``sum`` and ``mean`` by each utterance's T_b as well; ``mean_frames`` and
    ``mean_tokens`` are already normalised and ignore it.

    For B = 0 the weights are empty; ``_reduce`` then gives what torch's own losses
    give on an empty batch (0 for ``sum``, NaN for the means).
    """
    B = logit_lengths.shape[0]
    frames = logit_lengths.to(torch.float64)  # on the lengths' device: no host sync
    if reduction in ("none", "sum") or B == 0:
        return 1.0 / frames if per_frame else torch.ones(B, dtype=torch.float64)
    if reduction == "mean_frames" or (reduction == "mean" and per_frame):
        return 1.0 / (B * frames)
    if reduction == "mean":
        return torch.full((B,), 1.0 / B, dtype=torch.float64)
    _check_reduction(reduction)
    tokens = target_lengths.clamp(min=1).sum().to(torch.float64)  # mean_tokens
    return torch.full((B,), 1.0, dtype=torch.float64) / tokens


def _reduce(losses: torch.Tensor, reduction: str, weights: torch.Tensor,
            weigh_none: bool = False) -> torch.Tensor:
    """The reduced loss: sum_b w_b * loss_b, or ``losses`` (times w with ``weigh_none``)."""
    if reduction == "none":
        if not weigh_none:
            return losses
        return (losses.to(torch.float64) * weights.to(losses.device)).to(losses.dtype)
    value = (losses.to(torch.float64) * weights.to(losses.device)).sum()
    if losses.shape[0] == 0 and reduction != "sum":
        value = value + math.nan  # the mean of nothing, as torch.mean of an empty tensor
    return value.to(losses.dtype)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the returned loss: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _negative_loss_tolerances(logit_lengths, target_lengths, dtype, fused,
                              tolerance=negative_loss_tolerance) -> torch.Tensor:
    """``(B,)`` ``tolerance`` (``lattice.negative_loss_tolerance``, or the TDT lattice's)
    of each utterance; log-prob input (not ``fused``) carries its own dtype's rounding."""
    input_eps = 0.0 if fused else torch.finfo(dtype).eps
    return torch.tensor([
        tolerance(int(t), int(u), dtype == torch.float64, input_eps)
        for t, u in zip(torch.as_tensor(logit_lengths).tolist(),
                        torch.as_tensor(target_lengths).tolist(), strict=True)
    ], dtype=torch.float64)


# --------------------------------------------------------------------------- engines
def engine_for(backend: str, logits: torch.Tensor) -> Engine:
    """The ``Engine`` of ``backend`` (``auto`` follows the logits' device); never a fallback."""
    backend = as_choice("backend", backend, BACKENDS)
    if backend == "auto":
        backend = "cuda" if logits.is_cuda else "cpu"
    engine = load_engine(backend)
    engine.check_device(logits)
    return engine


def _warn_impossible(log_like: torch.Tensor, bad: torch.Tensor, tolerance: torch.Tensor,
                     name: str = "rnnt_loss") -> None:
    """``ImpossibleLossWarning``s naming the utterances whose loss is NaN, inf or negative;
    ``name`` (``rnnt_loss``, ``tdt_loss``) starts each message."""
    nan_utts = torch.nonzero(bad).flatten().tolist()
    inf_utts = torch.nonzero(torch.isinf(log_like) & ~bad).flatten().tolist()
    negative = torch.nonzero(log_like > tolerance.to(log_like.dtype)).flatten().tolist()
    if negative:
        warnings.warn(ImpossibleLossWarning(
            f"{name}: the loss of utterance(s) {negative} is negative "
            f"({', '.join(f'{-float(log_like[b]):.6g}' for b in negative[:5])}), which "
            "-log P(y|x) cannot be: are the inputs log-probabilities that do not "
            "normalise (fused_log_softmax=False on logits)?",
            "negative", negative,
        ), stacklevel=4)
    if nan_utts:
        warnings.warn(ImpossibleLossWarning(
            f"{name}: NaN or +inf in the logits of utterance(s) {nan_utts} (or, with "
            "validate=False, bad labels or lengths): their loss is NaN and their gradient zero",
            "nan", nan_utts,
        ), stacklevel=4)
    if inf_utts:
        warnings.warn(ImpossibleLossWarning(
            f"{name}: no alignment of utterance(s) {inf_utts} has non-zero probability "
            "(-inf log-probs on every path): their loss is inf and their gradient zero",
            "inf", inf_utts,
        ), stacklevel=4)


def _losses(engine: Engine, opts: LossOptions, logits, targets, logit_lengths, target_lengths,
            keep_state: bool) -> tuple[torch.Tensor, ForwardState]:
    """Stages 1-2 on ``engine``: ``(per-utterance losses (B,), state)``.

    The state's ``log_like`` stays float64 for the gradient; the losses are
    rounded to ``loss_dtype``. Warns about non-finite and negative losses on the
    CPU (on CUDA that would need a host sync).
    """
    state = engine.forward(logits, targets, logit_lengths, target_lengths, opts, keep_state)
    log_like = torch.as_tensor(state.log_like)
    if not log_like.is_cuda:
        tolerance = _negative_loss_tolerances(
            logit_lengths, target_lengths, logits.dtype, opts.fused)
        _warn_impossible(log_like, torch.as_tensor(state.bad), tolerance)
    return (-log_like).to(loss_dtype(logits)), state


class _RNNTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, engine, opts, weights,
                weigh_none):
        losses, ctx.state = _losses(
            engine, opts, logits, targets, logit_lengths, target_lengths, True
        )
        ctx.engine, ctx.opts, ctx.weights = engine, opts, weights
        # The index tensors too: autograd then refuses a backward after they were
        # modified in place (the state's arrays on the CPU share their memory).
        ctx.save_for_backward(logits, targets, logit_lengths, target_lengths)
        return _reduce(losses, opts.reduction, weights, weigh_none)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        return engine_backward(ctx, grad_output), None, None, None, None, None, None, None


def engine_backward(ctx, grad_output) -> torch.Tensor:
    """Stage 3 of an autograd ``Function`` whose forward saved ``(logits, targets,
    logit_lengths, target_lengths)`` and set ``ctx.engine``, ``ctx.state``,
    ``ctx.opts`` and ``ctx.weights`` (``rnnt_loss``'s and ``tdt_loss``'s): the
    gradient w.r.t. the logits."""
    logits, _, _, _ = ctx.saved_tensors
    # Stays on grad_output's device: no host sync on the CUDA path.
    go = grad_output.detach().to(torch.float64)
    if ctx.opts.reduction != "none":
        go = go.expand(logits.shape[0])
    scale = go * ctx.weights.to(go.device)
    return ctx.engine.backward(logits, ctx.state, ctx.opts, scale)


def checked_index(logits, index, blank, checked: CallOptions, guards_indices: bool):
    """``(blank, targets, logit_lengths, target_lengths)`` as the engines take them:
    checked by ``check_inputs`` (against ``logits``' classes) when ``checked.validate``
    asks for it (``None``: unless that needs a host sync) or the engine does not guard
    indices itself, else only converted."""
    validate = checked.validate
    if validate is None:
        validate = not any(x.is_cuda for x in index)
    if validate or not guards_indices:
        return check_inputs(logits, *index, blank)
    return (blank, *(_index_values(x) for x in index))


def _loss(logits, targets, logit_lengths, target_lengths, blank, checked: CallOptions,
          per_frame: bool) -> torch.Tensor:
    """The loss with checked options; ``per_frame``: ``none``/``sum``/``mean`` of
    loss_b / T_b (SpeechBrain's values, ``TransducerLoss``)."""
    index = (targets, logit_lengths, target_lengths)
    blank = check_meta(logits, *index, blank)
    logits = resolve_logits(logits)
    engine = engine_for(checked.backend, logits)
    blank, targets, logit_lengths, target_lengths = checked_index(
        logits, index, blank, checked, engine.guards_indices)
    opts = checked.for_engine(blank)
    per_frame = per_frame and opts.reduction in ("none", "sum", "mean")
    weights = reduction_weights(opts.reduction, logit_lengths, target_lengths,
                                per_frame=per_frame)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _RNNTLossFunction.apply(
            logits, targets, logit_lengths, target_lengths, engine, opts, weights, per_frame
        )
    losses, _ = _losses(engine, opts, logits, targets, logit_lengths, target_lengths, False)
    return _reduce(losses, opts.reduction, weights, per_frame)


def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = -1,
    clamp: float | None = -1,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    *,
    fastemit_lambda: float = 0.0,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """RNN-Transducer loss ``-log P(y|x)`` in nats (Graves 2012), differentiable w.r.t. logits.

    A drop-in for ``torchaudio.functional.rnnt_loss``: its arguments in its order
    with its defaults (``blank=-1``, the last class; ``clamp=-1``, off), so that
    ``rnnt_loss(logits, targets, logit_lengths, target_lengths, 0)`` and every
    other call of torchaudio's gives torchaudio's value and gradient. rnntool's
    own options follow, keyword-only.

    Args:
        logits: ``(B, T, U+1, V)`` joint-network outputs, float16/bfloat16/float32/float64,
            any strides (expanded, stride-0 dims included), on the CPU or a CUDA device.
            Log-probabilities instead when ``fused_log_softmax=False``. A negative-bit
            view (``torch._neg_view``) is materialised first (the only case that copies).
        targets: ``(B, S)`` integer labels, ``S >= max(target_lengths)``; entries past an
            utterance's length are ignored.
        logit_lengths: ``(B,)`` frames per utterance, ``1 <= T_b <= T``.
        target_lengths: ``(B,)`` labels per utterance, ``0 <= U_b <= U`` (0: all-blank path).
            ``targets`` and the lengths are integer tensors (int8 to int64, uint8 to
            uint64) on the CPU or on the logits' device.
        blank: blank index, default -1 (the last class, torchaudio's default); negative
            counts from the end. A Python or numpy integer or a 0-d integer tensor (not
            a bool).
        clamp: clip each utterance's gradient ``d loss_b / d logits`` elementwise to
            ``[-clamp, clamp]`` before the reduction's scaling (torchaudio's convention);
            the default -1, any number ``<= 0``, ``None`` or ``inf`` disables it. NaN is
            an error.
        reduction: ``"none"`` ``(B,)``, ``"sum"``, ``"mean"`` (batch mean of the
            per-utterance losses, torchaudio's), and rnntool's ``"mean_frames"`` (mean
            of loss_b / T_b), ``"mean_tokens"`` (sum of losses / sum of max(U_b, 1)).
            The gradient always matches the value.
        fused_log_softmax: ``True``/``False``; if False the input is log-probs and the
            gradient is w.r.t. them.

    Keyword-only (rnntool's):
        fastemit_lambda: FastEmit regularisation (Yu et al. 2021), a finite number
            ``>= 0``: the gradient through every label emission is scaled by
            ``1 + lambda``. The returned loss stays the plain ``-log P(y|x)`` (NeMo
            returns ``(1 + lambda) * loss`` instead).
        backend: ``"auto"`` (the tensors' device), ``"cpu"`` or ``"cuda"``.
        validate: ``None``, ``True`` or ``False``: check label values and lengths,
            raising ``ValueError``. ``None`` (default) checks whenever that needs no
            host sync: always on the CPU, and on CUDA when targets and lengths are CPU
            tensors. ``False`` skips it on the CUDA backend only; bad values there never
            read out of bounds: that utterance's loss is NaN.

        ``clamp`` and ``fastemit_lambda`` take Python or numpy real numbers and 0-d
        real tensors (not bools, strings or tensors with a shape).

    Beyond torchaudio: float64 and bfloat16 logits, any integer dtype for targets
    and lengths (torchaudio wants int32), lengths shorter than the padded dims
    (torchaudio wants ``T = max T_b`` and ``U+1 = max U_b + 1``). Stricter: a label
    equal to blank within an utterance's length is a ``ValueError``. The loss of
    float16 logits comes back in float32 (torchaudio's in float16).

    Returns:
        The loss in float32 (float64 for float64 logits): ``(B,)`` for ``"none"``,
        else a scalar. NaN or +inf in an utterance's logits (within its lengths)
        makes its loss NaN; an utterance whose every path has probability 0 gets
        loss inf. Both give that utterance a zero gradient and a ``RuntimeWarning``
        naming it (CPU backend).

    Raises:
        TypeError: an argument of the wrong type, each checked before any work: logits,
            targets or lengths that are not dense (strided) torch tensors on the CPU or
            a CUDA device (numpy arrays, lists, sparse, nested, ``meta`` tensors), logits
            not float16/bfloat16/float32/float64 (integer, complex, quantized), targets or
            lengths not integer (bool, float); ``blank`` not an integer (a bool, a float);
            ``clamp``/``fastemit_lambda`` not a real number; ``reduction``/``backend``
            not a str; ``fused_log_softmax``/``validate`` not a bool.
        ValueError: a wrong value or shape, in one line naming the argument (and the
            utterance) and the values: wrong dims, batch sizes that disagree, V = 0,
            ``blank`` outside ``[-V, V)``, an unknown ``reduction``/``backend``, ``clamp``
            NaN, ``fastemit_lambda`` negative or not finite, targets or lengths on
            another device than the CPU or the logits', a backend the logits' device
            cannot run; when validating: labels ``>= V``, ``< 0`` or equal to blank,
            ``T_b = 0``, negative lengths, lengths beyond the padded dims.
        RuntimeError: ``backend="cuda"`` where Numba finds no usable GPU.
    """
    checked = check_options(reduction, fused_log_softmax, clamp, fastemit_lambda, backend,
                            validate)
    return _loss(logits, targets, logit_lengths, target_lengths, blank, checked, False)


class _LossModule(torch.nn.Module):
    """The options of ``rnnt_loss`` kept by a module, checked in the constructor
    (``blank``'s type here, its range against V in ``forward``) with the same
    ``TypeError``/``ValueError`` as ``rnnt_loss``, and checked again in ``forward``."""

    def __init__(self, blank, clamp, reduction, fused_log_softmax, fastemit_lambda, backend,
                 validate) -> None:
        super().__init__()
        as_index("blank", blank)
        check_options(reduction, fused_log_softmax, clamp, fastemit_lambda, backend, validate)
        self.blank = blank
        self.clamp = clamp
        self.reduction = reduction
        self.fused_log_softmax = fused_log_softmax
        self.fastemit_lambda = fastemit_lambda
        self.backend = backend
        self.validate = validate

    def _checked(self) -> CallOptions:
        return check_options(self.reduction, self.fused_log_softmax, self.clamp,
                             self.fastemit_lambda, self.backend, self.validate)

    def extra_repr(self) -> str:
        return f"blank={self.blank}, reduction={self.reduction!r}, backend={self.backend!r}"


class RNNTLoss(_LossModule):
    """RNN-T loss as an ``nn.Module``: a drop-in for ``torchaudio.transforms.RNNTLoss``.

    ``RNNTLoss(blank=-1, clamp=-1, reduction="mean", fused_log_softmax=True)`` in
    torchaudio's order with its defaults, then rnntool's ``fastemit_lambda``,
    ``backend`` and ``validate``, keyword-only; ``forward(logits, targets,
    logit_lengths, target_lengths)`` is ``rnnt_loss`` with these options (see it
    for every argument and error).
    """

    def __init__(
        self,
        blank: int = -1,
        clamp: float | None = -1.0,
        reduction: str = "mean",
        fused_log_softmax: bool = True,
        *,
        fastemit_lambda: float = 0.0,
        backend: str = "auto",
        validate: bool | None = None,
    ) -> None:
        super().__init__(blank, clamp, reduction, fused_log_softmax, fastemit_lambda, backend,
                         validate)

    def forward(self, logits, targets, logit_lengths, target_lengths):
        """logits ``(B, T, U+1, V)``, targets ``(B, S)``, lengths ``(B,)``."""
        return _loss(logits, targets, logit_lengths, target_lengths, self.blank,
                     self._checked(), False)


class TransducerLoss(_LossModule):
    """RNN-T loss as an ``nn.Module``: a drop-in for SpeechBrain's Numba ``TransducerLoss``,
    in value too, on CPU and CUDA tensors.

    ``TransducerLoss(blank=0, reduction="mean")`` as SpeechBrain's, then
    rnntool's options keyword-only (as ``rnnt_loss``'s; ``clamp=None``: off);
    ``forward(logits, labels, T, U)`` with ``T`` and ``U`` the absolute lengths
    (frames and labels per utterance), as SpeechBrain's module takes them.
    (SpeechBrain's function ``speechbrain.nnet.losses.transducer_loss`` takes
    relative lengths and turns them into these with ``(lens * dim).round().int()``:
    do that before calling.)

    Values: SpeechBrain's kernels divide each utterance's loss by its T_b, so
    ``"none"`` is ``loss_b / T_b`` ``(B,)``, ``"sum"`` their sum and ``"mean"``
    (the default) their batch mean, here as there. ``"mean_frames"`` is the same
    as ``"mean"``; ``"mean_tokens"`` keeps ``rnnt_loss``'s meaning (sum of loss_b /
    sum of max(U_b, 1)). ``rnnt_loss`` and ``RNNTLoss`` give the plain loss_b.

    Gradient: the gradient of the returned value, as everywhere in rnntool, so
    with ``"mean"`` each utterance's gradient is ``1 / (B * T_b)`` of its
    ``d loss_b / d logits``. SpeechBrain's is not: whatever the reduction, its
    backward hands back the unnormalised ``d loss_b / d logits`` (times
    ``grad_output``), which is the gradient of ``rnnt_loss(..., blank=0,
    reduction="sum")``. A model trained with SpeechBrain's loss took steps about
    ``B * T`` times larger (``B`` the batch size, ``T`` its typical frame count)
    than this module gives: to keep its dynamics, multiply the learning rate by
    about ``B * T`` with this module (not exact: the mean of loss_b / T_b also
    weighs short utterances more than SpeechBrain's gradient does; Adam's step
    barely depends on the gradient's scale, but its ``eps`` and any gradient
    clipping threshold do), or train with ``rnnt_loss(logits, labels, T, U, 0,
    reduction="sum")``, whose gradient is SpeechBrain's exactly (its value is not
    divided by T_b).

    The constructor checks every option as ``rnnt_loss`` does (``blank``'s type
    here, its range against V in ``forward``) and raises the same ``TypeError``/
    ``ValueError``; ``forward`` checks them again, with the tensors (errors name
    the tensors as ``rnnt_loss`` does: ``labels`` is ``targets``, ``T`` and ``U``
    are ``logit_lengths`` and ``target_lengths``).
    """

    def __init__(
        self,
        blank: int = 0,
        reduction: str = "mean",
        *,
        fused_log_softmax: bool = True,
        clamp: float | None = None,
        fastemit_lambda: float = 0.0,
        backend: str = "auto",
        validate: bool | None = None,
    ) -> None:
        super().__init__(blank, clamp, reduction, fused_log_softmax, fastemit_lambda, backend,
                         validate)

    def forward(self, logits, labels, T, U):  # noqa: N803 (SpeechBrain's names)
        """logits ``(B, T, U+1, V)``, labels ``(B, S)``, T and U ``(B,)`` absolute lengths."""
        return _loss(logits, labels, T, U, self.blank, self._checked(), True)
