"""The torch-facing loss: ``rnnt_loss``, ``TransducerLoss``, validation and backend dispatch.

The engine's stages live in ``cpu.py`` and ``cuda.py``; this module checks the
inputs, picks the backend, applies the reduction, and wires stage 3 into
``backward()`` so that nothing of size ``B*T*U*V`` exists before it.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from .lattice import negative_loss_tolerance

REDUCTIONS = ("none", "sum", "mean", "mean_frames", "mean_tokens")
BACKENDS = ("auto", "cpu", "cuda")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- validation
def _int_tensor(name: str, x, ndim: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    return x


def as_index(name: str, value) -> int:
    """``value`` as a Python int: ints, numpy integers and 0-d integer tensors/arrays.

    Raises ``TypeError`` for anything else (bools and floats included).
    """
    if isinstance(value, (bool, np.bool_)) or (
        isinstance(value, (torch.Tensor, np.ndarray)) and value.dtype in (torch.bool, np.bool_)
    ):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def check_meta(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> int:
    """Check what needs no tensor values (types, dims, batch, blank); return blank in [0, V).

    logits ``(B, T, U+1, V)``, targets ``(B, S)``, lengths ``(B,)``.
    """
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}"
        )
    if logits.dim() != 4:
        raise ValueError(f"logits must have 4 dims (B, T, U+1, V), got shape {tuple(logits.shape)}")
    _int_tensor("targets", targets, 2)
    _int_tensor("logit_lengths", logit_lengths, 1)
    _int_tensor("target_lengths", target_lengths, 1)
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
    blank = as_index("blank", blank)
    if not -V <= blank < V:
        raise ValueError(f"blank={blank} is outside [-V, V) for V={V}")
    return blank % V


def check_inputs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a batch fully; return ``(blank in [0, V), targets, T, U)`` as int64 CPU tensors.

    Raises ``TypeError``/``ValueError`` with one line naming the utterance and
    values. Reads the index tensors' values: a small device-to-host copy for CUDA ones.
    """
    blank = check_meta(logits, targets, logit_lengths, target_lengths, blank)
    _, T, U1, V = logits.shape
    t_len = logit_lengths.detach().to("cpu", torch.int64)
    u_len = target_lengths.detach().to("cpu", torch.int64)
    y = targets.detach().to("cpu", torch.int64).contiguous()
    S = y.shape[1]

    def first(mask: torch.Tensor) -> int | None:
        idx = torch.nonzero(mask)
        return None if idx.numel() == 0 else int(idx[0, 0])

    if (b := first(t_len < 0)) is not None:
        raise ValueError(f"utterance {b}: logit_lengths[{b}] = {int(t_len[b])} is negative")
    if (b := first(u_len < 0)) is not None:
        raise ValueError(f"utterance {b}: target_lengths[{b}] = {int(u_len[b])} is negative")
    if (b := first(t_len == 0)) is not None:
        raise ValueError(f"utterance {b}: logit_lengths[{b}] = 0, an utterance needs T >= 1")
    if (b := first(t_len > T)) is not None:
        raise ValueError(
            f"utterance {b}: logit_lengths[{b}] = {int(t_len[b])} exceeds the logits' T dim {T}"
        )
    if (b := first(u_len + 1 > U1)) is not None:
        raise ValueError(
            f"utterance {b}: target_lengths[{b}] = {int(u_len[b])} needs U+1 = "
            f"{int(u_len[b]) + 1} but the logits' U+1 dim is {U1}"
        )
    if (b := first(u_len > S)) is not None:
        raise ValueError(
            f"utterance {b}: target_lengths[{b}] = {int(u_len[b])} exceeds targets' dim {S}"
        )
    inside = torch.arange(S).unsqueeze(0) < u_len.unsqueeze(1)
    bad = inside & ((y < 0) | (y >= V) | (y == blank))
    if bool(bad.any()):
        b, u = (int(i) for i in torch.nonzero(bad)[0])
        val = int(y[b, u])
        why = "equals blank" if val == blank else f"is outside [0, {V}) for V={V}"
        raise ValueError(f"utterance {b}: targets[{b}, {u}] = {val} {why}")
    return blank, y, t_len, u_len


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def reduction_weights(
    reduction: str, logit_lengths: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """``(B,)`` float64 weights w with value = sum_b w_b * loss_b (any reduction but none).

    For B = 0 the weights are empty; ``_reduce`` then gives what torch's own losses
    give on an empty batch (0 for ``sum``, NaN for the means).
    """
    B = logit_lengths.shape[0]
    if reduction in ("none", "sum") or B == 0:
        return torch.ones(B, dtype=torch.float64)
    if reduction == "mean":
        return torch.full((B,), 1.0 / B, dtype=torch.float64)
    if reduction == "mean_frames":
        return 1.0 / (B * logit_lengths.to(torch.float64))
    _check_reduction(reduction)
    tokens = target_lengths.clamp(min=1).sum().to(torch.float64)  # mean_tokens
    return torch.full((B,), 1.0, dtype=torch.float64) / tokens


def _reduce(losses: torch.Tensor, reduction: str, weights: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return losses
    value = (losses.to(torch.float64) * weights.to(losses.device)).sum()
    if losses.shape[0] == 0 and reduction != "sum":
        value = value + math.nan  # the mean of nothing, as torch.mean of an empty tensor
    return value.to(losses.dtype)


def loss_dtype(logits: torch.Tensor) -> torch.dtype:
    """The dtype of the returned loss: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _negative_loss_tolerances(logit_lengths, target_lengths, dtype, fused) -> torch.Tensor:
    """``(B,)`` ``lattice.negative_loss_tolerance`` of each utterance; log-prob input
    (not ``fused``) carries its own dtype's rounding."""
    input_eps = 0.0 if fused else torch.finfo(dtype).eps
    return torch.tensor([
        negative_loss_tolerance(int(t), int(u), dtype == torch.float64, input_eps)
        for t, u in zip(torch.as_tensor(logit_lengths).tolist(),
                        torch.as_tensor(target_lengths).tolist(), strict=True)
    ], dtype=torch.float64)


# --------------------------------------------------------------------------- backends
class Engine(NamedTuple):
    """A backend's host functions: stages 1-2, stage 3, and the Viterbi twin of stage 2.

    ``guards_indices``: whether its kernels survive unchecked label values and
    lengths (CUDA: such an utterance gets a NaN loss). The CPU kernels do not,
    so ``rnnt_loss`` always validates for them.
    """

    forward: Callable
    backward: Callable
    best_path: Callable
    guards_indices: bool


def engine_for(backend: str, logits: torch.Tensor) -> Engine:
    """The ``Engine`` of ``backend`` (``auto`` follows the logits' device); never a fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend == "auto":
        backend = "cuda" if logits.is_cuda else "cpu"
    if backend == "cpu":
        if logits.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors; logits are on {logits.device}")
        from . import cpu

        return Engine(cpu.cpu_forward, cpu.cpu_backward, cpu.cpu_best_path, False)
    from . import cuda

    cuda.device_check(logits)
    return Engine(cuda.cuda_forward, cuda.cuda_backward, cuda.cuda_best_path, True)


def _warn_impossible(log_like: torch.Tensor, bad: torch.Tensor, tolerance: torch.Tensor) -> None:
    """RuntimeWarnings naming the utterances whose loss is NaN, inf or negative."""
    nan_utts = torch.nonzero(bad).flatten().tolist()
    inf_utts = torch.nonzero(torch.isinf(log_like) & ~bad).flatten().tolist()
    negative = torch.nonzero(log_like > tolerance.to(log_like.dtype)).flatten().tolist()
    if negative:
        warnings.warn(
            f"rnnt_loss: the loss of utterance(s) {negative} is negative "
            f"({', '.join(f'{-float(log_like[b]):.6g}' for b in negative[:5])}), which "
            "-log P(y|x) cannot be: are the inputs log-probabilities that do not "
            "normalise (fused_log_softmax=False on logits)?",
            RuntimeWarning,
            stacklevel=4,
        )
    if nan_utts:
        warnings.warn(
            f"rnnt_loss: NaN or +inf in the logits of utterance(s) {nan_utts} (or, with "
            "validate=False, bad labels or lengths): their loss is NaN and their gradient zero",
            RuntimeWarning,
            stacklevel=4,
        )
    if inf_utts:
        warnings.warn(
            f"rnnt_loss: no alignment of utterance(s) {inf_utts} has non-zero probability "
            "(-inf log-probs on every path): their loss is inf and their gradient zero",
            RuntimeWarning,
            stacklevel=4,
        )


def _losses(opts, logits, targets, logit_lengths, target_lengths, need_grad):
    """Stages 1-2 on the chosen engine: ``(per-utterance losses (B,), log_like, saved)``.

    ``log_like`` stays float64 for the gradient; the losses are rounded to
    ``loss_dtype``. Warns about non-finite and negative losses on the CPU (on
    CUDA that would need a host sync).
    """
    log_like, bad, saved = opts["engine"].forward(
        logits, targets, logit_lengths, target_lengths, opts["blank"], opts["fused"], need_grad
    )
    log_like_t = torch.as_tensor(log_like)
    if not log_like_t.is_cuda:
        tolerance = _negative_loss_tolerances(
            logit_lengths, target_lengths, logits.dtype, opts["fused"])
        _warn_impossible(log_like_t, torch.as_tensor(bad), tolerance)
    return (-log_like_t).to(loss_dtype(logits)), log_like, saved


class _RNNTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, opts):
        losses, ctx.log_like, ctx.saved = _losses(
            opts, logits, targets, logit_lengths, target_lengths, True
        )
        ctx.opts = opts
        ctx.save_for_backward(logits, targets, logit_lengths, target_lengths)
        return _reduce(losses, opts["reduction"], opts["weights"])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        logits, targets, logit_lengths, target_lengths = ctx.saved_tensors
        opts = ctx.opts
        # Stays on grad_output's device: no host sync on the CUDA path.
        go = grad_output.detach().to(torch.float64)
        if opts["reduction"] != "none":
            go = go.expand(logits.shape[0])
        scale = go * opts["weights"].to(go.device)
        grad = opts["engine"].backward(
            logits, targets, logit_lengths, target_lengths, opts["blank"], opts["fused"],
            ctx.saved, ctx.log_like, scale, opts["fastemit_lambda"], opts["clamp"],
        )
        return grad, None, None, None, None


def rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int = 0,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    clamp: float | None = None,
    fastemit_lambda: float = 0.0,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """RNN-Transducer loss ``-log P(y|x)`` in nats (Graves 2012), differentiable w.r.t. logits.

    Args:
        logits: ``(B, T, U+1, V)`` joint-network outputs, float16/bfloat16/float32/float64,
            any strides. Log-probabilities instead when ``fused_log_softmax=False``.
        targets: ``(B, S)`` integer labels, ``S >= max(target_lengths)``; entries past an
            utterance's length are ignored.
        logit_lengths: ``(B,)`` frames per utterance, ``1 <= T_b <= T``.
        target_lengths: ``(B,)`` labels per utterance, ``0 <= U_b <= U`` (0: all-blank path).
        blank: blank index; negative counts from the end (-1 = last).
        reduction: ``"none"`` ``(B,)``, ``"sum"``, ``"mean"`` (batch mean),
            ``"mean_frames"`` (mean of loss_b / T_b), ``"mean_tokens"``
            (sum of losses / sum of max(U_b, 1)). The gradient always matches the value.
        fused_log_softmax: if False the input is log-probs and the gradient is w.r.t. them.
        clamp: clip each utterance's gradient ``d loss_b / d logits`` elementwise to
            ``[-clamp, clamp]`` before the reduction's scaling (torchaudio's convention);
            ``None`` or ``<= 0`` disables it.
        fastemit_lambda: FastEmit regularisation (Yu et al. 2021): the gradient through
            every label emission is scaled by ``1 + lambda``. The returned loss stays the
            plain ``-log P(y|x)`` (NeMo returns ``(1 + lambda) * loss`` instead).
        backend: ``"auto"`` (the tensors' device), ``"cpu"`` or ``"cuda"``.
        validate: check label values and lengths, raising ``ValueError``. ``None``
            (default) checks whenever that needs no host sync: always on the CPU, and
            on CUDA when targets and lengths are CPU tensors. ``False`` skips it on the
            CUDA backend only; bad values there never read out of bounds: that
            utterance's loss is NaN.

    Returns:
        The loss in float32 (float64 for float64 logits): ``(B,)`` for ``"none"``,
        else a scalar. NaN or +inf in an utterance's logits (within its lengths)
        makes its loss NaN; an utterance whose every path has probability 0 gets
        loss inf. Both give that utterance a zero gradient and a ``RuntimeWarning``
        naming it (CPU backend).

    Raises:
        TypeError, ValueError: bad input, with one line naming the utterance and values.
    """
    _check_reduction(reduction)
    engine = engine_for(backend, logits if isinstance(logits, torch.Tensor) else torch.empty(0))
    index = (targets, logit_lengths, target_lengths)
    if validate is None:
        validate = not any(isinstance(x, torch.Tensor) and x.is_cuda for x in index)
    if validate or not engine.guards_indices:
        blank, y, t_len, u_len = check_inputs(logits, *index, blank)
    else:
        blank = check_meta(logits, *index, blank)
        y, t_len, u_len = (x.to(torch.int64) for x in index)
    opts = {
        "engine": engine,
        "blank": blank,
        "fused": bool(fused_log_softmax),
        "reduction": reduction,
        "weights": reduction_weights(reduction, t_len, u_len),
        "clamp": float(clamp) if clamp is not None and clamp > 0 else 0.0,
        "fastemit_lambda": float(fastemit_lambda),
    }
    if torch.is_grad_enabled() and logits.requires_grad:
        return _RNNTLossFunction.apply(logits, y, t_len, u_len, opts)
    losses, _, _ = _losses(opts, logits, y, t_len, u_len, False)
    return _reduce(losses, reduction, opts["weights"])


class TransducerLoss(torch.nn.Module):
    """RNN-T loss as an ``nn.Module``; ``forward(logits, labels, T, U)`` as SpeechBrain's.

    A drop-in for SpeechBrain's Numba ``TransducerLoss`` on CPU and CUDA tensors.
    Options as ``rnnt_loss``; ``reduction="mean_frames"`` is SpeechBrain's
    per-frame normalisation, with a gradient that matches the value.
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
        super().__init__()
        _check_reduction(reduction)
        self.blank = blank
        self.reduction = reduction
        self.fused_log_softmax = fused_log_softmax
        self.clamp = clamp
        self.fastemit_lambda = fastemit_lambda
        self.backend = backend
        self.validate = validate

    def forward(self, logits, labels, T, U):  # noqa: N803 (SpeechBrain's names)
        """logits ``(B, T, U+1, V)``, labels ``(B, S)``, T and U ``(B,)`` lengths."""
        return rnnt_loss(
            logits, labels, T, U,
            blank=self.blank, reduction=self.reduction,
            fused_log_softmax=self.fused_log_softmax, clamp=self.clamp,
            fastemit_lambda=self.fastemit_lambda, backend=self.backend,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return f"blank={self.blank}, reduction={self.reduction!r}, backend={self.backend!r}"
