"""The contract between the loss engine's backends and the rest: typed options, typed
forward state, and the one table that names the backends.

``loss.py``, ``align.py`` and ``score.py`` reach the kernels only through an
``Engine`` from ``load_engine``; ``cpu.py`` and ``cuda.py`` each export one as
``ENGINE``, built from their twin host functions. A variant whose forward state is
RNN-T's (two log-probs per node) would be its kernels, an ``Engine`` built from
them, and one entry in ``ENGINES``; TDT's state is not (it also carries D duration
log-probs per node, and its arcs jump frames), so it has its own contract and
table: ``tdt_lattice.TDTEngine`` / ``TDTState`` and ``tdt_lattice.TDT_ENGINES``
(``tdt_cpu.TDT_ENGINE``, ``tdt_cuda.TDT_ENGINE``), reached by ``tdt.py``,
``align.tdt_align`` and, for a TDT dump (``model_kind="tdt"``), ``score.py``.

The twin stages, side by side (``lattice.py`` holds the per-node rules both compile):

==================================  =======================  ========================
stage                               ``cpu.py``               ``cuda.py``
==================================  =======================  ========================
1. normalise, one pass over V       ``cpu_normalise``        ``cuda_normalise``
2. alpha and beta                   ``cpu_alpha_beta``       ``cuda_alpha_beta``
2. alpha only (no gradient)         ``cpu_alpha_loss``       ``cuda_alpha_loss``
2. Viterbi, for alignments          ``cpu_viterbi``          ``cuda_viterbi``
3. gradient, one pass over V        ``cpu_gradient``         ``cuda_gradient``
``Engine.forward`` (stages 1-2)     ``cpu_forward``          ``cuda_forward``
``Engine.backward`` (stage 3)       ``cpu_backward``         ``cuda_backward``
``Engine.best_path`` (Viterbi)      ``cpu_best_path``        ``cuda_best_path``
``Engine.lattice_terms`` (stage 1)  ``cpu_lattice_terms``    ``cuda_lattice_terms``
``Engine.forward_compact`` (2)      ``cpu_forward_compact``  ``cuda_forward_compact``
==================================  =======================  ========================

``lattice_terms`` is stage 1 keeping what a lattice dump stores (the two
log-probs and log of the sum of the other probabilities squared);
``forward_compact`` is stage 2 on such arrays, read back from a dump.

Torch-free (and numba-free): ``rnntool score`` on the CPU goes through this
table without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

# backend name -> the module whose ``ENGINE`` runs it (imported on first use).
ENGINES = {"cpu": "rnntool.cpu", "cuda": "rnntool.cuda"}


@dataclass(frozen=True)
class LossOptions:
    """``rnnt_loss``'s options, checked and normalised, as the engine and the reduction
    read them.

    ``blank`` in ``[0, V)``; ``fused``: the input is logits (log-softmax fused
    into the kernels), else log-probs; ``clamp > 0`` clips each utterance's
    gradient to ``[-clamp, clamp]``, 0.0 is off; ``fastemit_lambda >= 0``;
    ``reduction`` one of ``loss.REDUCTIONS`` (applied by ``loss.py``, not the engine).
    """

    blank: int
    fused: bool = True
    clamp: float = 0.0
    fastemit_lambda: float = 0.0
    reduction: str = "none"


@dataclass(frozen=True)
class ForwardState:
    """What stages 1 and 2 hand on, to stage 3 (``backward``) and to alignments.

    Arrays of the backend: numpy on the CPU, torch tensors on CUDA. ``B``
    utterances padded to ``T`` frames and ``U1 = U+1`` label positions.

    - ``log_like`` ``(B,)`` float64: ``log P(y|x)``, NaN for a bad utterance.
    - ``bad`` ``(B,)`` bool: NaN or +inf in the utterance's logits (on CUDA also
      label values or lengths out of range, possible only without host validation).
    - ``blank_lp``, ``emit_lp`` ``(B, T, U1)`` in the lattice float type (float64
      for float64 logits, else float32): the blank and next-label log-probs of
      each node, -inf outside the lengths.
    - ``targets`` ``(B, S)``, ``logit_lengths``, ``target_lengths`` ``(B,)``:
      int64, as the kernels read them.
    - Kept only when the forward was asked to (``keep_state``), else None:
      ``lse`` ``(B, T, U1, 2)`` lattice float, the log-normaliser as (row max,
      log of the sum of exp(x - max)); ``alpha``, ``beta`` ``(B, T, U1)`` float64.
    """

    log_like: Any
    bad: Any
    blank_lp: Any
    emit_lp: Any
    targets: Any
    logit_lengths: Any
    target_lengths: Any
    lse: Any = None
    alpha: Any = None
    beta: Any = None


class LatticeTerms(NamedTuple):
    """What stage 1 computes for a lattice dump (``Engine.lattice_terms``).

    Arrays of the backend, ``(B, T, U1)`` in the lattice float type (float64 for
    float64 logits, else float32), -inf outside the lengths:

    - ``blank_lp``: log P(blank | t, u); ``emit_lp``: log P(y_{u+1} | t, u), -inf at
      u = U_b. The same bits as ``ForwardState``'s arrays from the same logits.
    - ``log_p2_others``: log of the sum of p_v**2 over every v but the blank and
      y_{u+1} (at u = U_b: every v but the blank). With the two log-probs it gives
      the per-node gradient norm exactly (``analysis.lattice_gradient_norms``);
      summed without those two entries, so a peaked row keeps its small sum.
    - ``bad`` ``(B,)`` bool: NaN or +inf in the utterance's logits (its arrays hold NaN).
    """

    blank_lp: Any
    emit_lp: Any
    log_p2_others: Any
    bad: Any


class Engine(NamedTuple):
    """A backend's host functions: the only seam between the kernels and the rest.

    - ``check_device(logits)``: raise unless this backend can run these tensors.
    - ``forward(logits, targets, logit_lengths, target_lengths, opts, keep_state)
      -> ForwardState``: stages 1 and 2 on validated inputs (``loss.check_inputs``);
      with ``keep_state`` also what ``backward`` and ``best_path`` need.
    - ``backward(logits, state, opts, scale) -> grad``: stage 3, the gradient
      ``(B, T, U1, V)`` in the logits' dtype, utterance b's scaled by ``scale[b]``.
    - ``best_path(state) -> (best (B,), from_emit (B, T, U1))``: the Viterbi twin
      of stage 2 on a kept state.
    - ``guards_indices``: whether the kernels survive unchecked label values and
      lengths (CUDA: such an utterance gets a NaN loss). The CPU kernels do not,
      so ``rnnt_loss`` always validates for them.
    - ``lattice_terms(logits, targets, logit_lengths, target_lengths, opts)
      -> LatticeTerms``: stage 1 for a lattice dump, on validated inputs.
    - ``forward_compact(blank_lp, emit_lp, targets, logit_lengths, target_lengths,
      keep_state) -> ForwardState``: stage 2 on compact ``(B, T, U1)`` arrays (a
      lattice dump's, padded); the state ``forward`` gives for the logits they came
      from, without ``lse`` (so no ``backward``), ``bad`` where the loss is NaN.
    """

    name: str
    check_device: Callable[[Any], None]
    forward: Callable[[Any, Any, Any, Any, LossOptions, bool], ForwardState]
    backward: Callable[[Any, ForwardState, LossOptions, Any], Any]
    best_path: Callable[[ForwardState], tuple[Any, Any]]
    guards_indices: bool
    lattice_terms: Callable[[Any, Any, Any, Any, LossOptions], LatticeTerms]
    forward_compact: Callable[[Any, Any, Any, Any, Any, bool], ForwardState]


def load_engine(backend: str) -> Engine:
    """The ``Engine`` of ``backend``, one of ``ENGINES`` (its module imported on first use)."""
    return importlib.import_module(ENGINES[backend]).ENGINE


class ImpossibleLossWarning(RuntimeWarning):
    """A loss that ``-log P(y|x)`` cannot be, named by ``rnnt_loss`` (CPU backend).

    ``reason``: ``"negative"`` (below 0 beyond rounding), ``"nan"`` (NaN or +inf
    in the logits, or bad labels or lengths) or ``"inf"`` (no alignment has
    non-zero probability); ``utterances``: their batch indices. The message
    starts with ``"rnnt_loss: "``.
    """

    def __init__(self, message: str, reason: str = "", utterances: tuple[int, ...] = ()):
        super().__init__(message)
        self.reason = reason
        self.utterances = tuple(utterances)

    def __reduce__(self):
        return type(self), (str(self), self.reason, self.utterances)
