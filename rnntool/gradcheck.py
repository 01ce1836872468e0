"""Gradient checks: the engine against the float64 reference, the reference against
finite differences, a trainer's stored gradient, and CPU against CUDA.

All gradients here are of one utterance's own loss ``-log P(y|x)`` w.r.t. its
``(T, U+1, V)`` logits, with no reduction scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .loss import rnnt_loss
from .reference import reference_gradients, reference_loss_value


@dataclass
class Check:
    """One comparison of gradient ``got`` with ``expected``."""

    check: str
    max_abs_err: float
    max_rel_err: float
    passed: bool
    n: int  # entries compared


class Checks(list):
    """The ``Check``s of one utterance, and its float64 reference ``loss``."""

    def __init__(self, loss: float, checks=()) -> None:
        super().__init__(checks)
        self.loss = loss


def compare(name: str, got: np.ndarray, expected: np.ndarray, rtol: float, atol: float) -> Check:
    """Pass when every entry has ``|got - expected| <= atol + rtol * |expected|``."""
    got = np.asarray(got, np.float64).ravel()
    expected = np.asarray(expected, np.float64).ravel()
    err = np.abs(got - expected)
    finite = np.isfinite(got).all() and np.isfinite(expected).all()
    rel = err / np.maximum(np.abs(expected), atol)
    ok = bool(finite and (err <= atol + rtol * np.abs(expected)).all())
    return Check(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)), ok, got.size)


def finite_difference_indices(grad: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """Flat indices to probe: half where the gradient is largest, half uniformly at random."""
    rng = np.random.default_rng(seed)
    flat = np.abs(grad).ravel()
    k = min(samples, flat.size)
    top = np.argsort(-flat)[: (k + 1) // 2]
    rest = rng.choice(flat.size, size=min(k - top.size, flat.size), replace=False)
    return np.unique(np.concatenate([top, rest]))[:k]


def engine_gradient(logits: np.ndarray, targets: np.ndarray, blank: int, fused: bool,
                    backend: str) -> np.ndarray:
    """d loss / d logits ``(T, U+1, V)`` from the engine, in float64 (computed in the
    logits' own dtype, as a trainer would get it)."""
    device = "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(np.ascontiguousarray(logits))[None].to(device).requires_grad_(True)
    y = torch.from_numpy(np.asarray(targets, np.int64))[None].to(device)
    T, U1 = logits.shape[:2]
    loss = rnnt_loss(x, y, torch.tensor([T]), torch.tensor([U1 - 1]), blank=blank,
                     reduction="sum", fused_log_softmax=fused, backend=backend)
    loss.backward()
    return x.grad[0].double().cpu().numpy()


def grad_check_utterance(
    logits: np.ndarray, targets: np.ndarray, *, blank: int, fused: bool = True,
    backend: str = "cpu", samples: int = 20, rtol: float = 1e-3, atol: float = 1e-5,
    stored: np.ndarray | None = None, compare_cuda: bool = False, fd_step: float = 1e-5,
) -> Checks:
    """Every check that applies to one utterance, in a fixed order.

    ``logits`` ``(T, U+1, V)``; ``stored`` a gradient the user's trainer wrote;
    ``compare_cuda``: also CPU against CUDA (when both backends run here).
    The result's ``loss`` is the float64 reference loss; when it is not finite
    (NaN or +inf logits, no possible alignment) no gradient exists to check
    and the result is empty.
    """
    V = logits.shape[-1]
    blank = blank % V
    x64 = torch.from_numpy(np.asarray(logits, np.float64))[None]
    y = torch.from_numpy(np.asarray(targets, np.int64))[None]
    T, U1 = logits.shape[:2]
    with np.errstate(all="ignore"):
        losses, ref = reference_gradients(x64, y, torch.tensor([T]), torch.tensor([U1 - 1]),
                                          blank=blank, fused_log_softmax=fused)
    checks = Checks(float(losses[0]))
    if not np.isfinite(checks.loss):
        return checks
    ref = ref[0].numpy()
    got = engine_gradient(logits, targets, blank, fused, backend)
    checks.append(compare(f"{backend}-vs-reference", got, ref, rtol, atol))

    idx = finite_difference_indices(ref, samples)
    base = np.asarray(logits, np.float64).copy()
    flat = base.reshape(-1)
    fd = np.empty(idx.size)
    for k, i in enumerate(idx):
        h = fd_step * max(1.0, abs(flat[i]))
        old = flat[i]
        flat[i] = old + h
        up = reference_loss_value(base, targets, blank, fused)
        flat[i] = old - h
        down = reference_loss_value(base, targets, blank, fused)
        flat[i] = old
        fd[k] = (up - down) / (2 * h)
    # Finite differences carry about eps / h of noise: loosen atol to match.
    fd_atol = max(atol, 1e-11 / fd_step * max(1.0, float(np.abs(base).max())))
    checks.append(compare("reference-vs-finite-diff", ref.reshape(-1)[idx], fd, rtol, fd_atol))

    if stored is not None:
        checks.append(compare("stored-vs-reference", stored, ref, rtol, atol))
    if compare_cuda and backend != "cuda":
        cuda_grad = engine_gradient(logits, targets, blank, fused, "cuda")
        checks.append(compare("cpu-vs-cuda", got, cuda_grad, rtol, atol))
    return checks


def cuda_usable() -> bool:
    """True where backend='cuda' runs: a real GPU, or Numba's simulator when it is on."""
    try:
        from . import cuda
    except ImportError:
        return False
    return cuda.SIMULATOR or (torch.cuda.is_available() and cuda.cuda.is_available())

