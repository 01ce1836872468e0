"""The torch-facing TDT loss: ``tdt_loss`` and ``TDTLoss`` (Token-and-Duration Transducer).

The lattice is ``tdt_lattice.py``'s; the kernels are ``tdt_cpu.py`` and
``tdt_cuda.py`` behind a ``TDTEngine``. This module checks the inputs (with
``loss.py``'s checkers: the same messages as ``rnnt_loss``), picks the engine,
applies the reduction, and wires stage 3 into ``backward()`` so that nothing of
size ``B*T*U*(V+D)`` exists before it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import loss as _loss_mod
from .loss import (
    CallOptions,
    as_index,
    as_real,
    check_meta,
    check_options,
    checked_index,
    engine_backward,
    loss_dtype,
    reduction_weights,
    resolve_logits,
)
from .tdt_lattice import (
    TDT_ENGINES,
    TDTEngine,
    TDTOptions,
    TDTState,
    check_duration_values,
    load_tdt_engine,
)
from .tdt_lattice import negative_loss_tolerance as _tolerance

__all__ = ["tdt_loss", "TDTLoss", "check_durations"]


# --------------------------------------------------------------------------- validation
def check_durations(durations) -> tuple[int, ...]:
    """``durations`` as a tuple of ints: strictly ascending, ``>= 0``, with 0 and 1.

    Takes a list or tuple of integers, a 1-D integer numpy array or tensor.
    ``TypeError`` for anything else (a str, floats, bools); ``ValueError`` in one
    line naming the value for an empty set, a negative entry, one above 2**31 - 1,
    an entry not above the one before it, or a set without 0 or 1 (e.g. ``[0, 2, 4]``).
    """
    if isinstance(durations, torch.Tensor | np.ndarray):
        if durations.ndim != 1:
            raise ValueError(f"durations must be 1-D, got shape {tuple(durations.shape)}")
        durations = durations.tolist()
    if isinstance(durations, str | bytes) or not isinstance(durations, list | tuple):
        raise TypeError(
            "durations must be a list or tuple of integers (e.g. [0, 1, 2, 3, 4]), got "
            f"{type(durations).__name__}"
        )
    values = tuple(as_index(f"durations[{i}]", d) for i, d in enumerate(durations))
    return check_duration_values(values)


def as_sigma(value) -> float:
    """``sigma``: a finite number ``>= 0`` (nats subtracted from every token log-prob)."""
    sigma = as_real("sigma", value)
    if not (0.0 <= sigma < math.inf):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    return sigma


def check_tdt_meta(logits, targets, logit_lengths, target_lengths, blank,
                   durations: tuple[int, ...]) -> tuple[int, int]:
    """Check what needs no tensor values; return ``(blank in [0, V), V)``.

    ``V = logits.shape[-1] - len(durations)``: the token classes come first along
    the last dim, then one logit per duration (NeMo's joint layout). The checks of
    ``rnnt_loss`` (``loss.check_meta``) run on the token part, so the messages are
    the same; a last dim that leaves no token, or a blank outside ``[-V, V)``, is a
    ``ValueError`` saying how V was found.
    """
    _loss_mod._check_tensor("logits", logits)
    if logits.dim() != 4:
        raise ValueError(
            f"logits must have 4 dims (B, T, U+1, V + D), got shape {tuple(logits.shape)}")
    D = len(durations)
    last = logits.shape[-1]
    V = last - D
    if V < 1:
        raise ValueError(
            f"logits' last dim is {last} but must be V + D with V >= 1 tokens and D = "
            f"len(durations) = {D} (V = logits.shape[-1] - len(durations) = {V})")
    b = as_index("blank", blank)
    if not -V <= b < V:
        raise ValueError(
            f"blank={b} is outside [-V, V) for V={V} tokens (V = logits.shape[-1] - "
            f"len(durations) = {last} - {D}; blank indexes the tokens, negative from "
            "their end)")
    return check_meta(logits.detach()[..., :V], targets, logit_lengths, target_lengths, b), V


def _engine_for(backend: str, logits: torch.Tensor) -> TDTEngine:
    if backend == "auto":
        backend = "cuda" if logits.is_cuda else "cpu"
    engine = load_tdt_engine(backend)
    engine.check_device(logits)
    return engine


assert set(TDT_ENGINES) == set(_loss_mod.ENGINES)  # backend names as rnnt_loss's


# --------------------------------------------------------------------------- autograd
def _losses(engine: TDTEngine, opts: TDTOptions, logits, targets, logit_lengths,
            target_lengths, keep_state: bool) -> tuple[torch.Tensor, TDTState]:
    state = engine.forward(logits, targets, logit_lengths, target_lengths, opts, keep_state)
    log_like = torch.as_tensor(state.log_like)
    if not log_like.is_cuda:
        tolerance = _loss_mod._negative_loss_tolerances(
            logit_lengths, target_lengths, logits.dtype, opts.fused, _tolerance)
        _loss_mod._warn_impossible(log_like, torch.as_tensor(state.bad), tolerance, "tdt_loss")
    return (-log_like).to(loss_dtype(logits)), state


class _TDTLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, logit_lengths, target_lengths, engine, opts, weights):
        losses, ctx.state = _losses(engine, opts, logits, targets, logit_lengths,
                                    target_lengths, True)
        ctx.engine, ctx.opts, ctx.weights = engine, opts, weights
        ctx.save_for_backward(logits, targets, logit_lengths, target_lengths)
        return _loss_mod._reduce(losses, opts.reduction, weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        return engine_backward(ctx, grad_output), None, None, None, None, None, None


def _tdt_loss(logits, targets, logit_lengths, target_lengths, blank, durations, sigma,
              checked: CallOptions) -> torch.Tensor:
    durations = check_durations(durations)
    sigma = as_sigma(sigma)
    index = (targets, logit_lengths, target_lengths)
    blank, V = check_tdt_meta(logits, *index, blank, durations)
    logits = resolve_logits(logits)
    engine = _engine_for(checked.backend, logits)
    blank, targets, logit_lengths, target_lengths = checked_index(
        logits.detach()[..., :V], index, blank, checked, engine.guards_indices)
    opts = TDTOptions(blank=blank, durations=durations, sigma=sigma, fused=checked.fused,
                      clamp=checked.clamp, fastemit_lambda=checked.fastemit_lambda,
                      reduction=checked.reduction)
    weights = reduction_weights(opts.reduction, logit_lengths, target_lengths)
    if torch.is_grad_enabled() and logits.requires_grad:
        return _TDTLossFunction.apply(logits, targets, logit_lengths, target_lengths, engine,
                                      opts, weights)
    losses, _ = _losses(engine, opts, logits, targets, logit_lengths, target_lengths, False)
    return _loss_mod._reduce(losses, opts.reduction, weights)


# --------------------------------------------------------------------------- public API
def tdt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    durations,
    blank: int,
    sigma: float = 0.0,
    reduction: str = "mean",
    fused_log_softmax: bool = True,
    clamp: float | None = None,
    fastemit_lambda: float = 0.0,
    backend: str = "auto",
    validate: bool | None = None,
) -> torch.Tensor:
    """Token-and-Duration Transducer loss ``-log P(y|x)`` in nats (Xu et al. 2023,
    arXiv:2304.06795), differentiable w.r.t. logits, on the CPU and CUDA.

    The lattice (README, "TDT"): from node (t, u) a blank with duration d >= 1 goes
    to (t+d, u), the next label with duration d >= 0 to (t+d, u+1); arcs land on
    frames <= T_b - 1, except a blank from u = U_b landing exactly on T_b, which
    ends the path. An arc's log-prob is its token's log P minus ``sigma`` plus its
    duration's log Q.

    Args:
        logits: ``(B, T, U+1, V + D)`` joint outputs, float16/bfloat16/float32/float64,
            any strides, CPU or CUDA: per node the ``V`` token logits (blank among
            them), then one logit per entry of ``durations`` (NeMo's joint layout).
            ``V = logits.shape[-1] - len(durations)``. Tokens and durations are
            normalised by two separate log-softmaxes; with ``fused_log_softmax=False``
            both parts are log-probs already and the gradient is w.r.t. them.
        targets: ``(B, S)`` integer labels in ``[0, V)``, none equal to blank within
            the lengths. logit_lengths ``(B,)``: ``1 <= T_b <= T``; target_lengths
            ``(B,)``: ``0 <= U_b <= U``. Integer tensors on the CPU or the logits' device.

    Keyword-only:
        durations: the duration set, frames: strictly ascending integers ``>= 0``
            containing 0 and 1 (e.g. ``[0, 1, 2, 3, 4]``); a list, tuple, 1-D array
            or tensor. NeMo's ``durations``.
        blank: the blank's index among the ``V`` tokens (negative counts from the end
            of the tokens: -1 is ``V - 1``, NeMo's TDT blank). NeMo's ``blank_idx``.
        sigma: logit under-normalisation (NeMo's ``sigma``), a finite number >= 0 of
            nats subtracted from every token log-prob (blank and labels) in the lattice.
        reduction: ``"none"`` ``(B,)``, ``"sum"``, ``"mean"`` (batch mean),
            ``"mean_frames"`` (mean of loss_b / T_b), ``"mean_tokens"`` (sum of losses
            / sum of max(U_b, 1)); the gradient matches the value.
        clamp: clip each utterance's token gradient to ``[-clamp, clamp]`` before the
            reduction scales it (duration gradients are not clipped, as in NeMo);
            ``None``, ``<= 0`` or ``inf``: off; NaN is an error.
        fastemit_lambda: FastEmit (Yu et al. 2021), finite ``>= 0``: the gradient
            through the token log-prob of every label arc is scaled by ``1 + lambda``
            (durations' gradients unchanged, as NeMo's TDT kernel); the value stays
            the plain loss (NeMo returns ``(1 + lambda)`` times it).
        backend: ``"auto"`` (the logits' device), ``"cpu"`` or ``"cuda"``.
        validate: as ``rnnt_loss``'s: ``None`` checks label values and lengths unless
            that needs a host sync; ``False`` skips it on CUDA only (a bad utterance's
            loss is NaN, nothing is read out of bounds).

    NeMo's ``omega`` (a random switch to the plain RNN-T loss during training) is a
    training trick, not part of the loss, and is left out.

    Returns:
        The loss in float32 (float64 for float64 logits): ``(B,)`` for ``"none"``,
        else a scalar. NaN or +inf in an utterance's logits, or a node whose tokens
        or durations are all ``-inf`` (fused), makes its loss NaN; an utterance no
        path can explain gets inf. Both give a zero gradient and, on the CPU, an
        ``ImpossibleLossWarning`` naming the utterance.

    Raises:
        TypeError: as ``rnnt_loss`` (tensor types, dtypes, option types), and for
            ``durations`` that are not a list/tuple/1-D array of integers or a
            ``sigma`` that is not a real number.
        ValueError: one line naming the argument, the utterance and the value: as
            ``rnnt_loss`` (dims, batch sizes, devices, labels ``>= V``, ``< 0`` or
            equal to blank, lengths), and: durations empty, negative, not strictly
            ascending or without 0 or 1; a last dim that leaves no token
            (``V = logits.shape[-1] - len(durations) < 1``); blank outside
            ``[-V, V)``; sigma negative or not finite.
        RuntimeError: ``backend="cuda"`` where Numba finds no usable GPU.
    """
    checked = check_options(reduction, fused_log_softmax, clamp, fastemit_lambda, backend,
                            validate)
    return _tdt_loss(logits, targets, logit_lengths, target_lengths, blank, durations, sigma,
                     checked)


class TDTLoss(torch.nn.Module):
    """The TDT loss as an ``nn.Module``: ``forward(logits, targets, logit_lengths,
    target_lengths)`` is ``tdt_loss`` with the options given here (see it for every
    argument and error). Options are checked in the constructor and again in forward.

    Mapping from NeMo's ``TDTLoss(blank_idx, durations, reduction, fastemit_lambda,
    clamp, sigma, omega)``: ``blank=blank_idx``, ``durations``, ``sigma`` and
    ``fastemit_lambda`` as they are, ``clamp`` (NeMo's ``clamp > 0`` clips token
    gradients too), ``omega`` left out; NeMo takes token and duration logits as
    one ``(B, T, U+1, V + D)`` tensor too.
    """

    def __init__(
        self,
        *,
        durations,
        blank: int,
        sigma: float = 0.0,
        reduction: str = "mean",
        fused_log_softmax: bool = True,
        clamp: float | None = None,
        fastemit_lambda: float = 0.0,
        backend: str = "auto",
        validate: bool | None = None,
    ) -> None:
        super().__init__()
        self.durations = check_durations(durations)
        as_index("blank", blank)
        as_sigma(sigma)
        check_options(reduction, fused_log_softmax, clamp, fastemit_lambda, backend, validate)
        self.blank = blank
        self.sigma = sigma
        self.reduction = reduction
        self.fused_log_softmax = fused_log_softmax
        self.clamp = clamp
        self.fastemit_lambda = fastemit_lambda
        self.backend = backend
        self.validate = validate

    def forward(self, logits, targets, logit_lengths, target_lengths):
        """logits ``(B, T, U+1, V + D)``, targets ``(B, S)``, lengths ``(B,)``."""
        checked = check_options(self.reduction, self.fused_log_softmax, self.clamp,
                                self.fastemit_lambda, self.backend, self.validate)
        return _tdt_loss(logits, targets, logit_lengths, target_lengths, self.blank,
                         self.durations, self.sigma, checked)

    def extra_repr(self) -> str:
        return (f"durations={list(self.durations)}, blank={self.blank}, sigma={self.sigma}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
