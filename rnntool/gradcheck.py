"""Gradient checks: the engine in the dump's dtype against the engine in float64,
the float64 engine against finite differences (and, for small utterances, the
slow independent float64 reference), a trainer's stored gradient, and CPU
against CUDA.

All gradients here are of one utterance's own loss ``-log P(y|x)`` w.r.t. its
``(T, U+1, V)`` logits, with no reduction scaling. ``grad_check_utterance``
works on arrays; ``check_utterance`` on an utterance of a dump, as
``rnntool grad-check`` does, and returns its rows.

The checks, in row order (each compares ``got`` with ``expected``):

- ``{backend}-vs-float64``: the engine's gradient in the logits' dtype (what a
  trainer gets) against the same engine run in float64 on the same values (the
  logits cast up exactly). For float64 logits the two are the same computation
  and agree exactly.
- ``float64-vs-finite-diff``: the float64 engine gradient against central
  differences of the float64 engine's loss (forward only, no gradient) at
  ``samples`` entries, half where the gradient is largest, half at random
  (those at a -inf logit left out).
- ``float64-vs-reference``: the float64 engine gradient against
  ``reference.py`` (a plain double loop differentiated by torch autograd,
  sharing no code with the kernels), every entry. Only when the reference
  runs: by default (``reference=None``) when ``reference_work`` is at most
  ``REFERENCE_MAX_WORK``; ``reference=True`` always, ``False`` never.
- ``stored-vs-reference`` / ``stored-vs-float64``: a trainer's stored gradient
  against the reference when it ran, else against the float64 engine gradient.
- ``cpu-vs-cuda``: the CPU engine's gradient in the logits' dtype against the
  CUDA engine's.

**Pass rule.** Every row has ``worst_ratio``, the largest
``|got - expected| / (atol + rtol·|expected|)`` over its entries (inf for a
NaN or infinite value; 0/0 counts 0); it passes iff ``worst_ratio <= 1``. The
row's ``atol`` and ``rtol`` are the ones it was judged by, so the verdict can be
read from the row. ``max_abs_err`` and ``max_rel_err``
(``|got - expected| / max(|expected|, atol)``) are each a maximum over all
entries, possibly different ones: a row can show both above their tolerance
and still pass (an entry with error 1.5e-5 at ``|expected|`` = 0.01 against
atol 1e-5, rtol 1e-3); ``worst_ratio`` decides.

**Finite differences.** ``fd = (L(x + h) - L(x - h)) / (x_+ - x_-)`` with
``h = fd_step`` (1e-4) and ``x_±`` the float64 numbers actually probed. Its
error is truncation plus rounding. Truncation is ``h²/6·|L'''|``; along one
logit the loss is a difference of two functions ``log(a·e^x + b)``, each with
``|third derivative| <= 1/(6·sqrt 3)``, so ``|L'''| <= 0.2`` and truncation
``<= h²/30`` (3.3e-10). Rounding is ``eps_L / h`` where ``eps_L``, the float64
loss's rounding error, is bounded by ``eps64·(T+U)·max(1, |L|, max|x|)``
(1.7e-13·(T+U)·... e.g. 7.6e-7 for T=200, U=40 and a loss of 1430, where the
error measured over 40 probes is 6e-9). The row's atol is
``max(atol, h²/30 + eps64·(T+U)·max(1, |L|, max|x|) / h)``: the user's atol
unless the bound is larger. (h = 1e-6 would make the measured error 100 times
larger: 6.6e-7.)

**Precision.** The engine computes float16 and float32 logits in a float32
lattice, and float32 log-probs summed along T+U arcs make every posterior
relatively wrong by about eps32·(T+U). The ``g_v = occ·p_v - γ_∅[v = ∅] -
γ_y[v = y]`` of a node (occupancy ``occ``, arc posteriors ``γ``) is then off by
about eps32·(T+U)·m_v, ``m_v = occ·p_v + γ_∅[v = ∅] + γ_y[v = y]`` (without the
``occ·p_v`` term for log-prob input). A failed comparison of a float16 or float32
gradient (``{backend}-vs-float64``, ``stored-vs-*`` when the stored gradient or
the logits are float16/32, ``cpu-vs-cuda``) is marked ``precision_limited``
(with a ``note``) when each of its failing entries is within
``PRECISION_FACTOR·eps32·(T+U)·m_v + eps_d·|g64_v| + tiny_d`` of the float64
engine's gradient ``g64`` (twice that for ``cpu-vs-cuda``, two reduced-precision
gradients), ``eps_d`` the compared dtype's epsilon (its own rounding), ``tiny_d``
the larger of its smallest subnormal and 2^-120 = 7.5e-37 (the float32 kernels
flush results near float32's smallest normal, 1.2e-38, to 0), and ``m`` from the
float64 engine's alignment. The float64 rows then say whether the engine is
right; to compare a trainer's values more tightly, dump the logits as float64.
PRECISION_FACTOR = 8: measured float32 errors reach 0.3·eps32·(T+U)·m_v for
random logits of scale 1-5 (T+U from 240 to 1100), 2.1 for scale 20; the flag is
a hint and never changes a verdict, but an error of 1e-3 on an entry with m_v ~ 1
reads as rounding once T+U > 1000.

**Cost.** Two engine gradients (the dtype's and float64's), one float64 forward
and 2·samples float64 forwards (each O(T·(U+1)·V), no gradient), and the
comparisons; on this project's shared 2-core machine T=200, U=40, V=512 in
float32 with a stored gradient takes 0.9 s of CPU in the library, 3-4 s for
``rnntool grad-check`` end to end (was 11 min 45 s for T=201, U=37, V=512). The
reference costs about 3-15 ns times (T·(U+1))²·V (each of its 2·T·(U+1) scalar
index operations back-propagates a dense ``(T, U+1, V)`` tensor): 0.65 s of CPU
at T=100, U=20, V=50 (2.2e8) on a quiet moment, 4 s under load, and 3e10 for
T=201, U=37, V=512. ``REFERENCE_MAX_WORK`` = 2.5e8 keeps it to a few seconds.

**TDT.** With ``durations`` (a TDT dump: logits ``(T, U+1, V + D)``, V token
logits then D duration logits) every check is of ``tdt_loss`` (sigma 0, no
clamp, no FastEmit) instead of ``rnnt_loss``, over all ``V + D`` entries of each
node, tokens and durations alike, in the same rows; the reference is
``tdt_reference.tdt_reference_gradients`` (its own loops and autograd), run when
``(T·(U+1))²·(V + D)`` is at most ``REFERENCE_MAX_WORK``. The finite-difference
bound is the same (a duration logit enters the loss through its own softmax, in
the same ``log(a·e^x + b)`` form, and a path has at most T+U arcs). The
precision scale ``m`` of a token entry is as above with the TDT alignment's
occupancy and arc posteriors (summed over durations); of a duration entry
``occ·(Q_i + 1)``, a bound on ``occ·Q_i + post_i`` (``post_i <= occ``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .devices import cuda_usable, tensor_device
from .engine import ImpossibleLossWarning
from .loss import rnnt_loss
from .reference import reference_gradients
from .tdt import tdt_loss
from .tdt_reference import tdt_reference_gradients

if TYPE_CHECKING:
    from .reader import DumpReader, Utterance

GRADCHECK_FIELDS = ["utt_id", "check", "max_abs_err", "max_rel_err", "worst_ratio", "atol",
                    "rtol", "result"]

# The reference runs by default when (T·(U+1))²·V is at most this (see the module doc).
REFERENCE_MAX_WORK = 2.5e8
# How many eps32·(T+U)·m_v a reduced-precision gradient may be off (see the module doc).
PRECISION_FACTOR = 8.0
_EPS32 = float(np.finfo(np.float32).eps)
_EPS64 = float(np.finfo(np.float64).eps)
# The float32 kernels flush results near float32's smallest normal (1.2e-38) to 0.
_TINY32 = 2.0**-120


@dataclass
class Check:
    """One comparison of gradient ``got`` with ``expected``: ``n`` entries judged by
    ``atol`` and ``rtol``; passed iff ``worst_ratio <= 1``.

    ``precision_limited``: it failed, but every failing entry is within what float16/32
    arithmetic can do (module doc); ``note`` then says so, in one sentence.
    """

    check: str
    max_abs_err: float
    max_rel_err: float
    worst_ratio: float
    n: int
    atol: float
    rtol: float
    precision_limited: bool = False
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.worst_ratio <= 1.0


class Checks(list):
    """The ``Check``s of one utterance, its float64 engine ``loss``, and whether the
    float64 ``reference`` ran."""

    def __init__(self, loss: float, checks=(), reference: bool = False) -> None:
        super().__init__(checks)
        self.loss = loss
        self.reference = reference


def error_ratios(got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    """``|got - expected| / (atol + rtol·|expected|)`` per entry (flat, float64): inf
    where either is NaN or infinite, 0 where the error and the tolerance are both 0."""
    got = np.asarray(got, np.float64).ravel()
    expected = np.asarray(expected, np.float64).ravel()
    with np.errstate(all="ignore"):
        err = np.abs(got - expected)
        tol = atol + rtol * np.abs(expected)
        ratio = np.where(err == 0, 0.0, err / tol)
    ratio[~(np.isfinite(got) & np.isfinite(expected))] = np.inf
    return ratio


def compare(name: str, got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> Check:
    """``got`` against ``expected``: passes iff every entry has
    ``|got - expected| <= atol + rtol·|expected|`` (``worst_ratio <= 1``)."""
    got = np.asarray(got, np.float64).ravel()
    expected = np.asarray(expected, np.float64).ravel()
    with np.errstate(all="ignore"):
        err = np.abs(got - expected)
        rel = err / np.maximum(np.abs(expected), atol)
    worst = float(error_ratios(got, expected, rtol, atol).max(initial=0.0))
    return Check(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)), worst,
                 got.size, atol, rtol)


def finite_difference_indices(grad: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """Flat indices to probe: half where the gradient is largest, half uniformly at random."""
    rng = np.random.default_rng(seed)
    flat = np.abs(grad).ravel()
    k = min(samples, flat.size)
    top = np.argsort(-flat)[: (k + 1) // 2]
    rest = rng.choice(flat.size, size=min(k - top.size, flat.size), replace=False)
    return np.unique(np.concatenate([top, rest]))[:k]


def reference_work(T: int, U1: int, V: int) -> float:
    """What the float64 reference costs for ``(T, U+1, V)`` logits, in units of about
    1-10 ns of CPU: ``(T·(U+1))²·V``."""
    return float(T * U1) ** 2 * V


def runs_reference(shape: tuple[int, int, int], reference: bool | None = None) -> bool:
    """Whether ``grad_check_utterance`` runs the reference for logits of ``shape``:
    ``reference`` if given, else when ``reference_work`` is at most ``REFERENCE_MAX_WORK``."""
    if reference is not None:
        return bool(reference)
    return reference_work(*shape) <= REFERENCE_MAX_WORK


def _loss(x, y, T: int, U: int, *, blank: int, fused: bool, backend: str, durations=None):
    """The engine's summed loss of a batch of one: ``rnnt_loss``, or with ``durations``
    ``tdt_loss`` (logits ``(1, T, U+1, V + D)``; sigma 0)."""
    kw = dict(blank=blank, reduction="sum", fused_log_softmax=fused, backend=backend)
    if y.shape[1] == 0:  # the kernels want a non-empty targets row
        y = y.new_zeros((1, 1))
    if durations is None:
        return rnnt_loss(x, y, torch.tensor([T]), torch.tensor([U]), **kw)
    return tdt_loss(x, y, torch.tensor([T]), torch.tensor([U]), durations=durations, **kw)


def utterance_gradient(logits: np.ndarray, targets: np.ndarray, *, blank: int,
                       fused: bool = True, backend: str = "cpu",
                       durations=None) -> torch.Tensor:
    """d loss / d logits ``(T, U+1, V)`` of one utterance from the engine, as a trainer
    would get it: in the logits' own dtype, on ``backend``'s device (``tensor_device``).
    With ``durations``: ``tdt_loss``'s, over ``(T, U+1, V + D)`` logits."""
    device = tensor_device(backend)
    x = torch.from_numpy(np.ascontiguousarray(logits))[None].to(device).requires_grad_(True)
    y = torch.from_numpy(np.asarray(targets, np.int64))[None].to(device)
    T, U1 = logits.shape[:2]
    loss = _loss(x, y, T, U1 - 1, blank=blank, fused=fused, backend=backend,
                 durations=durations)
    loss.backward()
    return x.grad[0]


def engine_gradient(logits: np.ndarray, targets: np.ndarray, blank: int, fused: bool,
                    backend: str, durations=None) -> np.ndarray:
    """``utterance_gradient`` as a float64 numpy array."""
    return utterance_gradient(logits, targets, blank=blank, fused=fused, backend=backend,
                              durations=durations).double().cpu().numpy()


def engine_loss(logits: torch.Tensor, targets: torch.Tensor, blank: int, fused: bool,
                backend: str, durations=None) -> float:
    """The engine's loss of one utterance, forward only: ``logits`` ``(1, T, U+1, V)``
    (TDT, with ``durations``: ``(1, T, U+1, V + D)``) on ``backend``'s device,
    ``targets`` ``(1, U)``."""
    T, U1 = logits.shape[1:3]
    with torch.no_grad():
        loss = _loss(logits, targets, T, U1 - 1, blank=blank, fused=fused, backend=backend,
                     durations=durations)
    return float(loss)


def finite_differences(x: torch.Tensor, targets: torch.Tensor, idx: np.ndarray, *,
                       blank: int, fused: bool, backend: str, step: float,
                       durations=None) -> np.ndarray:
    """Central differences of ``engine_loss`` at flat indices ``idx`` of ``x``
    ``(1, T, U+1, V)`` float64, each divided by the probed points' own distance.
    ``x`` is changed one entry at a time and restored. ``durations``: of the TDT loss."""
    flat = x.view(-1)
    fd = np.empty(idx.size)
    for k, i in enumerate(idx.tolist()):
        old = float(flat[i])
        up, down = old + step, old - step
        flat[i] = up
        f_up = engine_loss(x, targets, blank, fused, backend, durations)
        flat[i] = down
        f_down = engine_loss(x, targets, blank, fused, backend, durations)
        flat[i] = old
        fd[k] = (f_up - f_down) / (up - down)
    return fd


def finite_difference_error(T: int, U: int, loss: float, max_abs_logit: float,
                            step: float) -> float:
    """A bound on the error of ``finite_differences`` (module doc): truncation
    ``step²/30`` plus rounding ``eps64·(T+U)·max(1, |loss|, max|x|) / step``."""
    return step**2 / 30 + _EPS64 * (T + U) * max(1.0, abs(loss), max_abs_logit) / step


def precision_scale(logits: np.ndarray, targets: np.ndarray, blank: int,
                    fused: bool, durations=None) -> np.ndarray:
    """``m_v = occ·p_v + γ_∅[v = ∅] + γ_y[v = y]`` ``(T, U+1, V)`` from the float64
    engine's alignment (CPU): the size of the terms of each gradient entry, the
    scale of its float32 rounding (module doc). With ``durations``: ``(T, U+1, V + D)``
    from the TDT alignment (module doc, *TDT*)."""
    if durations is not None:
        return _tdt_precision_scale(logits, targets, blank, fused, durations)
    from .align import align

    x = np.asarray(logits, np.float64)
    T, U1, _ = x.shape
    y = torch.from_numpy(np.asarray(targets, np.int64))
    a = align(torch.from_numpy(x)[None], y[None], torch.tensor([T]), torch.tensor([U1 - 1]),
              blank=blank, fused_log_softmax=fused, backend="cpu")[0]
    if fused:
        m = torch.softmax(torch.from_numpy(x), -1).numpy() * a.occupancy[:, :, None]
    else:
        m = np.zeros_like(x)
    m[:, :, blank] += a.blank_posteriors
    u = np.arange(U1 - 1)
    m[:, u, y.numpy()] += a.emit_posteriors
    return m


def _tdt_precision_scale(logits, targets, blank: int, fused: bool, durations) -> np.ndarray:
    """``precision_scale`` of TDT logits ``(T, U+1, V + D)``."""
    from .align import tdt_align

    x = np.asarray(logits, np.float64)
    T, U1, W = x.shape
    V = W - len(durations)
    y = torch.from_numpy(np.asarray(targets, np.int64))
    a = tdt_align(torch.from_numpy(x)[None], (y if y.numel() else y.new_zeros(1))[None],
                  torch.tensor([T]), torch.tensor([U1 - 1]), durations=durations,
                  blank=blank, fused_log_softmax=fused, backend="cpu")[0]
    occ = a.occupancy[:, :, None]
    m = np.zeros_like(x)
    if fused:
        m[..., :V] = torch.softmax(torch.from_numpy(x[..., :V]), -1).numpy() * occ
        m[..., V:] = torch.softmax(torch.from_numpy(x[..., V:]), -1).numpy() * occ
    m[..., V:] += occ  # post_i <= occ
    m[:, :, blank] += a.blank_posteriors
    u = np.arange(U1 - 1)
    m[:, u, y.numpy()] += a.emit_posteriors
    return m


def precision_limited(got: np.ndarray, expected: np.ndarray, g64: np.ndarray,
                      scale: np.ndarray, T: int, U: int, dtype, rtol: float, atol: float,
                      copies: int = 1) -> bool:
    """Whether every entry where ``got`` fails against ``expected`` is within what
    ``dtype`` (float16/32) arithmetic can do: ``copies·(PRECISION_FACTOR·eps32·(T+U)·
    scale + eps_d·|g64| + tiny_d)`` (module doc). False when nothing fails or a value
    is not finite."""
    got = np.asarray(got, np.float64).ravel()
    expected = np.asarray(expected, np.float64).ravel()
    failing = error_ratios(got, expected, rtol, atol) > 1.0
    if not failing.any() or not (np.isfinite(got).all() and np.isfinite(expected).all()):
        return False
    info = np.finfo(dtype)
    bound = copies * (PRECISION_FACTOR * _EPS32 * (T + U) * np.ravel(scale)[failing]
                      + float(info.eps) * np.abs(np.ravel(g64)[failing])
                      + max(float(info.smallest_subnormal), _TINY32))
    return bool((np.abs(got[failing] - expected[failing]) <= bound).all())


def _reduced(*dtypes) -> np.dtype | None:
    """The coarsest of ``dtypes`` if it is float16 or float32, else None."""
    coarse = max((np.dtype(d) for d in dtypes), key=lambda d: float(np.finfo(d).eps))
    return coarse if coarse in (np.dtype(np.float16), np.dtype(np.float32)) else None


def grad_check_utterance(
    logits: np.ndarray, targets: np.ndarray, *, blank: int, fused: bool = True,
    backend: str = "cpu", samples: int = 20, rtol: float = 1e-3, atol: float = 1e-5,
    stored: np.ndarray | None = None, compare_cuda: bool = False, fd_step: float = 1e-4,
    reference: bool | None = None, on_step: Callable[[str], None] | None = None,
    durations=None,
) -> Checks:
    """Every check that applies to one utterance, in the order of the module doc.

    ``logits`` ``(T, U+1, V)`` float16/32/64 (with ``durations``, a TDT duration set:
    ``(T, U+1, V + D)`` and the TDT loss; module doc, *TDT*); ``stored`` a gradient the user's
    trainer wrote; ``compare_cuda``: also CPU against CUDA (when both backends run
    here); ``samples``: finite-difference probes (0: no such row); ``fd_step``: their
    step; ``reference``: run the slow float64 reference (None: when
    ``runs_reference`` says, by size); ``on_step(name)``: called with each row's
    check name before its work starts (progress). The result's ``loss`` is the
    float64 engine loss; when it is not finite (NaN or +inf logits, no possible
    alignment) no gradient exists to check and the result is empty.
    """
    step = on_step or (lambda name: None)
    T, U1, W = logits.shape
    U = U1 - 1
    blank = blank % (W - (0 if durations is None else len(durations)))
    # Passed only for TDT: the RNN-T calls stay what they were (tests stand in for them).
    tdt = {} if durations is None else {"durations": durations}
    dtype = np.asarray(logits).dtype
    x64 = np.asarray(logits, np.float64)
    device = tensor_device(backend)
    x = torch.from_numpy(x64.copy())[None].to(device)
    y = torch.from_numpy(np.asarray(targets, np.int64))[None].to(device)
    with warnings.catch_warnings():
        # A NaN, inf or negative loss is the caller's finding (``score.loss_problem``).
        warnings.simplefilter("ignore", ImpossibleLossWarning)
        checks = Checks(engine_loss(x, y, blank, fused, backend, **tdt))
        if not np.isfinite(checks.loss):
            return checks
        checks.reference = runs_reference((T, U1, W), reference)
        scale = []  # precision_scale, computed on the first failure that needs it

        def hint(c: Check, got, expected, dtypes, copies=1) -> Check:
            reduced = _reduced(*dtypes)
            if c.passed or reduced is None:
                return c
            if not scale:
                scale.append(precision_scale(x64, targets, blank, fused, **tdt))
            if precision_limited(got, expected, g64, scale[0], T, U, reduced, c.rtol, c.atol,
                                 copies):
                c.precision_limited = True
                what = "logits and grads" if c.check.startswith("stored") else "logits"
                c.note = (f"{c.check} fails within {reduced} rounding: every failing entry "
                          f"is within {PRECISION_FACTOR:g}·eps32·(T+U) (T+U = {T + U}) of "
                          "the float64 engine's gradient, relative to the entry's terms "
                          "(occupancy·p + arc posteriors); the float64 rows say whether the "
                          f"engine is right; to compare tighter, dump the {what} as float64")
            return c

        name = f"{backend}-vs-float64"
        step(name)
        g64 = engine_gradient(x64, targets, blank, fused, backend, **tdt)
        got = g64 if dtype == np.float64 else engine_gradient(logits, targets, blank, fused,
                                                              backend, **tdt)
        checks.append(hint(compare(name, got, g64, rtol, atol), got, g64, [dtype]))

        if samples > 0:
            step("float64-vs-finite-diff")
            idx = finite_difference_indices(g64, samples)
            finite = np.isfinite(x64.reshape(-1))
            idx = idx[finite[idx]]  # a -inf logit (a token ruled out) has no neighbourhood
            fd = finite_differences(x, y, idx, blank=blank, fused=fused, backend=backend,
                                    step=fd_step, **tdt)
            largest = float(np.abs(x64.reshape(-1)[finite]).max(initial=0.0))
            fd_atol = max(atol, finite_difference_error(T, U, checks.loss, largest, fd_step))
            checks.append(compare("float64-vs-finite-diff", g64.reshape(-1)[idx], fd, rtol,
                                  fd_atol))

        expected, against = g64, "float64"
        if checks.reference:
            step("float64-vs-reference")
            with np.errstate(all="ignore"):
                if durations is None:
                    _, ref = reference_gradients(
                        torch.from_numpy(x64)[None], y.cpu(), torch.tensor([T]),
                        torch.tensor([U]), blank=blank, fused_log_softmax=fused)
                else:
                    _, ref = tdt_reference_gradients(
                        torch.from_numpy(x64)[None], y.cpu(), torch.tensor([T]),
                        torch.tensor([U]), durations=durations, blank=blank,
                        fused_log_softmax=fused)
            expected, against = ref[0].numpy(), "reference"
            checks.append(compare("float64-vs-reference", g64, expected, rtol, atol))

        if stored is not None:
            name = f"stored-vs-{against}"
            step(name)
            stored = np.asarray(stored)
            checks.append(hint(compare(name, stored, expected, rtol, atol), stored, expected,
                               [dtype, stored.dtype]))

        if compare_cuda and backend != "cuda":
            step("cpu-vs-cuda")
            cuda_grad = engine_gradient(logits, targets, blank, fused, "cuda", **tdt)
            checks.append(hint(compare("cpu-vs-cuda", got, cuda_grad, rtol, atol), got,
                               cuda_grad, [dtype], copies=2))
    return checks


@dataclass
class CheckedUtterance:
    """The gradient checks of one utterance of a dump.

    ``rows``: one per check (``GRADCHECK_FIELDS``; and, for messages, ``_file``: the
    dump's name, ``_precision_limited`` and ``_note``: ``Check``'s), none when the
    loss is not finite; ``loss``: the float64 engine loss; ``problem``: why that loss
    cannot be true (``score.loss_problem``), None if it can; ``reference``: whether
    the float64 reference ran.
    """

    utt_id: str
    loss: float
    problem: str | None
    rows: list[dict] = field(default_factory=list)
    reference: bool = False


def check_utterance(
    reader: DumpReader, utt: Utterance, *, backend: str = "cpu", samples: int = 20,
    rtol: float = 1e-3, atol: float = 1e-5, compare_cuda: bool | None = None,
    reference: bool | None = None, on_step: Callable[[str], None] | None = None,
) -> CheckedUtterance:
    """``grad_check_utterance`` on one utterance of ``reader`` (read with
    ``reader.read(..., with_grads=True)``: a stored ``grads`` is checked too), with the
    dump's blank and input kind (a TDT dump: its durations and the TDT loss).
    ``compare_cuda`` None: CPU against CUDA whenever
    the backend is not CUDA and CUDA runs here (``cuda_usable``); ``reference`` and
    ``on_step`` as ``grad_check_utterance``'s."""
    from .score import utterance_problem

    if compare_cuda is None:
        compare_cuda = backend != "cuda" and cuda_usable()
    checks = grad_check_utterance(
        utt.logits, utt.labels, blank=reader.blank, fused=reader.input_kind == "logits",
        backend=backend, samples=samples, rtol=rtol, atol=atol, stored=utt.grads,
        compare_cuda=compare_cuda, reference=reference, on_step=on_step,
        durations=reader.durations if reader.model_kind == "tdt" else None,
    )
    utt_id = utt.info.utt_id
    return CheckedUtterance(
        utt_id=utt_id, loss=checks.loss,
        problem=utterance_problem(reader, utt.info, checks.loss, float64=True),
        rows=[{"utt_id": utt_id, "_file": reader.name, "check": c.check,
               "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err, "atol": c.atol,
               "rtol": c.rtol, "worst_ratio": c.worst_ratio,
               "result": "PASS" if c.passed else "FAIL",
               "_precision_limited": c.precision_limited, "_note": c.note} for c in checks],
        reference=checks.reference,
    )
