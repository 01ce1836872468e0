"""Alignments on the loss engine: Viterbi best paths, emission posteriors, occupancy.

Everything here reads the engine's ``ForwardState`` (stage 1's compact
``(B, T, U+1)`` log-probs, stage 2's alpha and beta) and the Viterbi twin of
stage 2 (``Engine.best_path``) on the chosen backend, then does O(B*T*U)
bookkeeping in float64 numpy.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass

import numpy as np
import torch

from .engine import LossOptions
from .loss import as_flag, check_inputs, check_meta, engine_for, resolve_logits


@dataclass
class Alignment:
    """One utterance's alignment. ``T`` frames, ``U`` labels.

    - ``loss``: ``-log P(y|x)`` over all alignments (nats).
    - ``best_log_prob``: log-probability of the single best (Viterbi) alignment.
    - ``frames`` ``(U,)``: the frame at which the best path emits each label.
    - ``path`` ``(T+U, 2)``: the best path's nodes (t, u), in order, each node
      left by the arc taken there (the last one by the final blank).
    - ``expected_frames`` ``(U,)``: sum over t of t * P(label u emitted at t).
    - ``frame_posteriors`` ``(U,)``: P(label u emitted at its Viterbi frame).
    - ``emit_posteriors`` ``(T, U)``: P(label u emitted at t); each column sums to 1.
    - ``occupancy`` ``(T, U+1)``: P(the alignment passes through (t, u)).
    - ``blank_posteriors`` ``(T, U+1)``: P(the alignment leaves (t, u) by its blank
      arc); with ``emit_posteriors`` the two arc posteriors of stage 3.

    Posteriors and occupancy are always within [0, 1] and expected frames within
    [0, T-1] (float rounding clipped away); a non-finite utterance (``loss`` NaN
    or inf) has NaN there instead.
    """

    T: int
    U: int
    loss: float
    best_log_prob: float
    frames: np.ndarray
    path: np.ndarray
    expected_frames: np.ndarray
    frame_posteriors: np.ndarray
    emit_posteriors: np.ndarray
    occupancy: np.ndarray
    blank_posteriors: np.ndarray


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _backtrack(from_emit: np.ndarray, T: int, U: int) -> tuple[np.ndarray, np.ndarray]:
    frames = np.zeros(U, np.int64)
    nodes = [(T - 1, U)]
    t, u = T - 1, U
    while t > 0 or u > 0:
        if from_emit[t, u]:
            u -= 1
            frames[u] = t
        else:
            t -= 1
        nodes.append((t, u))
    return frames, np.array(nodes[::-1], np.int64)


def align(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    blank: int = 0,
    fused_log_softmax: bool = True,
    backend: str = "auto",
) -> list[Alignment]:
    """Per-utterance alignments of a padded batch, on the CPU or CUDA backend.

    Arguments as ``rnnt_loss`` (logits ``(B, T, U+1, V)``, targets ``(B, S)``,
    lengths ``(B,)``, ``blank``, ``fused_log_softmax``, ``backend``), checked as
    there; the label values and lengths are always checked (the alignments are
    read on the host anyway). The Viterbi path breaks ties the same way on every
    backend (the blank arc wins). Returns a list of ``Alignment``, one per
    utterance, in batch order.

    Raises:
        TypeError: logits, targets or lengths that are not dense torch tensors on the
            CPU or a CUDA device, of the dtypes ``rnnt_loss`` takes; ``blank`` not an
            integer; ``fused_log_softmax`` not a bool; ``backend`` not a str.
        ValueError: wrong dims or batch sizes, ``blank`` outside ``[-V, V)``, an
            unknown ``backend`` or one the logits' device cannot run, targets or
            lengths on another device than the CPU or the logits', bad label values
            or lengths (one line naming the utterance and the values).
        RuntimeError: ``backend="cuda"`` where Numba finds no usable GPU.
    """
    fused = as_flag("fused_log_softmax", fused_log_softmax)
    index = (targets, logit_lengths, target_lengths)
    blank = check_meta(logits, *index, blank)
    logits = resolve_logits(logits)
    engine = engine_for(backend, logits)
    blank, targets, logit_lengths, target_lengths = check_inputs(logits, *index, blank)
    on_device = (targets, logit_lengths, target_lengths)
    if logits.is_cuda:
        on_device = tuple(a.to(logits.device) for a in on_device)
    with torch.no_grad():
        state = engine.forward(logits, *on_device, LossOptions(blank=blank, fused=fused), True)
        best, from_emit = engine.best_path(state)
    return _alignments(state, best, from_emit, logits.dtype == torch.float64)


def align_compact(blank_lp: np.ndarray, emit_lp: np.ndarray, targets: np.ndarray,
                  logit_lengths: np.ndarray, target_lengths: np.ndarray, *,
                  backend: str = "cpu") -> list[Alignment]:
    """``align`` of a lattice dump's compact arrays, on ``backend`` ("cpu" or "cuda").

    ``blank_lp``, ``emit_lp`` ``(B, T, U+1)`` float32/float64 numpy (entries outside
    the lengths, and ``emit_lp`` at u = U_b, are never read), targets ``(B, S)``
    and lengths ``(B,)`` int64, already validated (``DumpReader.read_lattice``).
    The same alignments as ``align`` of the logits the arrays came from.
    """
    from .engine import load_engine

    arrays = (blank_lp, emit_lp, targets, logit_lengths, target_lengths)
    if backend == "cuda":
        from .devices import tensor_device

        arrays = [torch.from_numpy(np.ascontiguousarray(a)).to(tensor_device(backend))
                  for a in arrays]
    engine = load_engine(backend)
    state = engine.forward_compact(*arrays, True)
    best, from_emit = engine.best_path(state)
    return _alignments(state, best, from_emit, blank_lp.dtype == np.float64)


def _alignments(state, best, from_emit, float64: bool) -> list[Alignment]:
    """Per-utterance ``Alignment``s from a kept forward state and its Viterbi table: the
    O(B*T*U) bookkeeping, in float64 numpy."""
    with np.errstate(invalid="ignore"):  # nodes outside the lengths may hold garbage
        blank_lp, emit_lp, alpha, beta = (
            _np(a).astype(np.float64)
            for a in (state.blank_lp, state.emit_lp, state.alpha, state.beta)
        )
    log_like, best, from_emit = _np(state.log_like).astype(np.float64), _np(best), _np(from_emit)
    logit_lengths, target_lengths = _np(state.logit_lengths), _np(state.target_lengths)
    # The loss rounded as rnnt_loss and score round it (float32 unless float64 logits).
    loss = (-log_like).astype(np.float64 if float64 else np.float32)
    loss = loss.astype(np.float64).tolist()
    out = []
    for b in range(log_like.shape[0]):
        T, U = int(logit_lengths[b]), int(target_lengths[b])
        ll = log_like[b]
        a, be = alpha[b, :T, : U + 1], beta[b, :T, : U + 1]
        # Probabilities, so in [0, 1]; but alpha + beta - log P carries rounding
        # (float64 now, float32 in the compact log-probs), and exp() of a rounded 0
        # can come out as 1 + 1e-14: clip, so that no posterior ever reads above 1.
        # np.clip keeps NaN (a non-finite utterance stays visibly non-finite).
        occupancy = np.clip(np.exp(a + be - ll), 0.0, 1.0)
        # P(emit label u at t) = alpha(t, u) * p(y_u | t, u) * beta(t, u+1) / P.
        emit_post = np.clip(np.exp(a[:, :U] + emit_lp[b, :T, :U] + be[:, 1:] - ll), 0.0, 1.0)
        # P(blank out of (t, u)) = alpha(t, u) * p(blank | t, u) * beta(t+1, u) / P; the
        # final blank out of (T-1, U) ends the path (beta 0 after it).
        after = np.full((T, U + 1), -np.inf)
        after[: T - 1] = be[1:]
        after[T - 1, U] = 0.0
        blank_post = np.clip(np.exp(a + blank_lp[b, :T, : U + 1] + after - ll), 0.0, 1.0)
        frames, path = _backtrack(from_emit[b], T, U)
        # A mean over frames 0..T-1, so within [0, T-1]; the same rounding (columns
        # summing to 1 + eps) could put it a hair outside.
        expected = np.clip((np.arange(T)[:, None] * emit_post).sum(0), 0.0, T - 1.0)
        out.append(Alignment(
            T=T, U=U, loss=loss[b], best_log_prob=float(best[b]), frames=frames, path=path,
            expected_frames=expected, frame_posteriors=emit_post[frames, np.arange(U)],
            emit_posteriors=emit_post, occupancy=occupancy, blank_posteriors=blank_post,
        ))
    return out


# --------------------------------------------------------------------------- TDT
@dataclass
class TDTAlignment(Alignment):
    """One utterance's alignment on the TDT duration lattice (``tdt_align``); the
    ``Alignment`` fields mean what they mean there, with arcs that jump frames:

    - ``frames`` ``(U,)``: the frame each label's arc leaves on the best path (its
      emission frame); ``token_durations`` ``(U,)``: that arc's duration (frames the
      path advances with it, 0 included).
    - ``arcs`` ``(n, 4)`` int64: the best path's arcs ``(t, u, token, duration)`` in
      order, blanks (token = blank, duration >= 1) and labels alike, the last one the
      blank that lands on frame T and ends the path (``tdt_lattice.backtrack``).
    - ``path`` ``(n + 1, 2)``: the nodes the arcs leave, then the end ``(T, U)``
      (one frame past the last; drawing it shows the final blank's jump).
    - ``emit_posteriors`` ``(T, U)``: P(label u emitted at t), summed over its
      durations; ``blank_posteriors`` ``(T, U+1)``: P(a blank leaves (t, u)), summed
      over durations. ``expected_frames``, ``frame_posteriors`` and ``occupancy``
      as in ``Alignment``.
    """

    token_durations: np.ndarray
    arcs: np.ndarray


def tdt_align(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    durations,
    blank: int,
    fused_log_softmax: bool = True,
    backend: str = "auto",
) -> list[TDTAlignment]:
    """Per-utterance TDT alignments of a padded batch, on the CPU or CUDA backend.

    Arguments as ``tdt_loss`` (logits ``(B, T, U+1, V + D)``, ``durations``, ``blank``
    among the V tokens, ``fused_log_softmax``, ``backend``; ``sigma`` is 0), checked
    with its errors; label values and lengths are always checked. The Viterbi path
    is the TDT engine's (``TDTEngine.best_path``: ties go to the shorter jump, the
    order ``tdt_reference_viterbi`` uses). Returns one ``TDTAlignment`` per
    utterance, in batch order. Raises TypeError/ValueError as ``tdt_loss``.
    """
    from .tdt import _engine_for, check_durations, check_tdt_meta
    from .tdt_lattice import TDTOptions

    fused = as_flag("fused_log_softmax", fused_log_softmax)
    durations = check_durations(durations)
    index = (targets, logit_lengths, target_lengths)
    blank, V = check_tdt_meta(logits, *index, blank, durations)
    logits = resolve_logits(logits)
    engine = _engine_for(backend, logits)
    blank, targets, logit_lengths, target_lengths = check_inputs(logits.detach()[..., :V],
                                                                 *index, blank)
    on_device = (targets, logit_lengths, target_lengths)
    if logits.is_cuda:
        on_device = tuple(a.to(logits.device) for a in on_device)
    opts = TDTOptions(blank=blank, durations=durations, fused=fused)
    with torch.no_grad():
        state = engine.forward(logits, *on_device, opts, True)
        best, last, from_arc = engine.best_path(state)
    return _tdt_alignments(state, best, last, from_arc, blank, logits.dtype == torch.float64)


def tdt_align_compact(blank_lp: np.ndarray, emit_lp: np.ndarray, dur_lp: np.ndarray,
                      targets: np.ndarray, logit_lengths: np.ndarray,
                      target_lengths: np.ndarray, *, durations, blank: int,
                      backend: str = "cpu") -> list[TDTAlignment]:
    """``tdt_align`` of a TDT lattice dump's compact arrays, on ``backend`` ("cpu" or
    "cuda"): ``blank_lp``, ``emit_lp`` ``(B, T, U+1)`` and ``dur_lp`` ``(B, T, U+1, D)``
    float32/float64 numpy (entries outside the lengths, and ``emit_lp`` at u = U_b,
    are never read), targets ``(B, S)`` and lengths ``(B,)`` int64, already validated
    (``DumpReader.read_lattice``); ``durations`` the dump's, ``blank`` in ``[0, V)``
    (only names the blank arcs). The same alignments as ``tdt_align`` of the logits
    the arrays came from (stage 2 and the Viterbi read nothing else).
    """
    from .tdt_lattice import load_tdt_engine

    arrays = (blank_lp, emit_lp, dur_lp, targets, logit_lengths, target_lengths)
    if backend == "cuda":
        from .devices import tensor_device

        arrays = [torch.from_numpy(np.ascontiguousarray(a)).to(tensor_device(backend))
                  for a in arrays]
    engine = load_tdt_engine(backend)
    b_lp, e_lp, d_lp, *index = arrays
    state = engine.forward_compact(b_lp, e_lp, d_lp, durations, *index, True)
    best, last, from_arc = engine.best_path(state)
    return _tdt_alignments(state, best, last, from_arc, blank, blank_lp.dtype == np.float64)


def _tdt_alignments(state, best, last, from_arc, blank: int,
                    float64: bool) -> list[TDTAlignment]:
    """``TDTAlignment``s from a kept TDT forward state and its Viterbi tables, in float64
    numpy: arc posteriors ``exp(alpha + arc log-prob + beta after it - log P)``."""
    from .tdt_lattice import backtrack

    with np.errstate(invalid="ignore"):
        blank_lp, emit_lp, dur_lp, alpha, beta = (
            _np(a).astype(np.float64)
            for a in (state.blank_lp, state.emit_lp, state.dur_lp, state.alpha, state.beta))
    durations = _np(state.durations).astype(np.int64)
    log_like, best, last, from_arc = (_np(state.log_like).astype(np.float64), _np(best),
                                      _np(last), _np(from_arc))
    targets = _np(state.targets)
    logit_lengths, target_lengths = _np(state.logit_lengths), _np(state.target_lengths)
    loss = (-log_like).astype(np.float64 if float64 else np.float32).astype(np.float64).tolist()
    out = []
    for b in range(log_like.shape[0]):
        T, U = int(logit_lengths[b]), int(target_lengths[b])
        ll = log_like[b]
        a, be = alpha[b, :T, : U + 1], beta[b, :T, : U + 1]
        occupancy = np.clip(np.exp(a + be - ll), 0.0, 1.0)
        emit_post = np.zeros((T, U))
        blank_post = np.zeros((T, U + 1))
        with np.errstate(invalid="ignore", over="ignore"):
            for i, d in enumerate(durations.tolist()):
                if d >= T + 1:
                    break
                n = T - d  # origins whose arc lands inside the utterance
                if n > 0:
                    emit_post[:n] += np.exp(a[:n, :U] + emit_lp[b, :n, :U] + dur_lp[b, :n, :U, i]
                                            + be[d:, 1:] - ll)
                    if d >= 1:
                        blank_post[:n] += np.exp(a[:n] + blank_lp[b, :n, : U + 1]
                                                 + dur_lp[b, :n, : U + 1, i] + be[d:] - ll)
                if d >= 1:  # the blank from (T - d, U) that ends the path
                    blank_post[T - d, U] += np.exp(a[T - d, U] + blank_lp[b, T - d, U]
                                                   + dur_lp[b, T - d, U, i] - ll)
        emit_post = np.clip(emit_post, 0.0, 1.0)
        blank_post = np.clip(blank_post, 0.0, 1.0)
        if not np.isfinite(ll):
            emit_post[:] = blank_post[:] = np.nan
        arcs = (backtrack(from_arc[b], int(last[b]), durations, blank, targets[b, :U], T, U)
                if np.isfinite(best[b]) else [])
        arcs = np.array(arcs, np.int64).reshape(-1, 4)
        is_label = arcs[:, 2] != blank  # labels are never the blank (validated)
        frames = arcs[is_label, 0] if len(arcs) else np.zeros(U, np.int64)
        token_durations = arcs[is_label, 3] if len(arcs) else np.zeros(U, np.int64)
        path = np.vstack([arcs[:, :2], [[T, U]]]).astype(np.int64) if len(arcs) else \
            np.zeros((0, 2), np.int64)
        expected = np.clip((np.arange(T)[:, None] * emit_post).sum(0), 0.0, T - 1.0)
        out.append(TDTAlignment(
            T=T, U=U, loss=loss[b], best_log_prob=float(best[b]), frames=frames, path=path,
            expected_frames=expected,
            frame_posteriors=(emit_post[frames, np.arange(U)] if len(frames) == U
                              else np.full(U, np.nan)),
            emit_posteriors=emit_post, occupancy=occupancy, blank_posteriors=blank_post,
            token_durations=token_durations, arcs=arcs,
        ))
    return out


class _CallableModule(types.ModuleType):
    """``rnntool.align`` names both this module and its ``align`` function: importing
    the submodule (``from rnntool.align import tdt_align``) rebinds the package's
    attribute to the module, so the module calls ``align`` when called, and
    ``rnntool.align(...)`` and ``rnntool.align.align_compact`` work in any order."""

    def __call__(self, *args, **kwargs):
        return align(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
