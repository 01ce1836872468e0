"""Gradient checks: the engine against the float64 reference, the reference against
finite differences, a trainer's stored gradient, and CPU against CUDA.

All gradients here are of one utterance's own loss ``-log P(y|x)`` w.r.t. its
``(T, U+1, V)`` logits, with no reduction scaling. ``grad_check_utterance``
works on arrays; ``check_utterance`` on an utterance of a dump, as
``rnntool grad-check`` does, and returns its rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .devices import cuda_usable, tensor_device
from .loss import rnnt_loss
from .reference import reference_gradients, reference_loss_value

if TYPE_CHECKING:
    from .reader import DumpReader, Utterance

GRADCHECK_FIELDS = ["utt_id", "check", "max_abs_err", "max_rel_err", "atol", "rtol", "result"]


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


def utterance_gradient(logits: np.ndarray, targets: np.ndarray, *, blank: int,
                       fused: bool = True, backend: str = "cpu") -> torch.Tensor:
    """d loss / d logits ``(T, U+1, V)`` of one utterance from the engine, as a trainer
    would get it: in the logits' own dtype, on ``backend``'s device (``tensor_device``)."""
    device = tensor_device(backend)
    x = torch.from_numpy(np.ascontiguousarray(logits))[None].to(device).requires_grad_(True)
    y = torch.from_numpy(np.asarray(targets, np.int64))[None].to(device)
    T, U1 = logits.shape[:2]
    loss = rnnt_loss(x, y, torch.tensor([T]), torch.tensor([U1 - 1]), blank=blank,
                     reduction="sum", fused_log_softmax=fused, backend=backend)
    loss.backward()
    return x.grad[0]


def engine_gradient(logits: np.ndarray, targets: np.ndarray, blank: int, fused: bool,
                    backend: str) -> np.ndarray:
    """``utterance_gradient`` as a float64 numpy array."""
    return utterance_gradient(logits, targets, blank=blank, fused=fused,
                              backend=backend).double().cpu().numpy()


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


@dataclass
class CheckedUtterance:
    """The gradient checks of one utterance of a dump.

    ``rows``: one per check (``GRADCHECK_FIELDS``, and ``_file``: the dump's name,
    for messages), none when the loss is not finite; ``loss``: the float64
    reference loss; ``problem``: why that loss cannot be true
    (``score.loss_problem``), None if it can.
    """

    utt_id: str
    loss: float
    problem: str | None
    rows: list[dict] = field(default_factory=list)


def check_utterance(
    reader: DumpReader, utt: Utterance, *, backend: str = "cpu", samples: int = 20,
    rtol: float = 1e-3, atol: float = 1e-5, compare_cuda: bool | None = None,
) -> CheckedUtterance:
    """``grad_check_utterance`` on one utterance of ``reader`` (read with
    ``reader.read(..., with_grads=True)``: a stored ``grads`` is checked too), with the
    dump's blank and input kind. ``compare_cuda`` None: CPU against CUDA whenever
    the backend is not CUDA and CUDA runs here (``cuda_usable``)."""
    from .score import utterance_problem

    if compare_cuda is None:
        compare_cuda = backend != "cuda" and cuda_usable()
    checks = grad_check_utterance(
        utt.logits, utt.labels, blank=reader.blank, fused=reader.input_kind == "logits",
        backend=backend, samples=samples, rtol=rtol, atol=atol, stored=utt.grads,
        compare_cuda=compare_cuda,
    )
    utt_id = utt.info.utt_id
    return CheckedUtterance(
        utt_id=utt_id, loss=checks.loss,
        problem=utterance_problem(reader, utt.info, checks.loss, float64=True),
        rows=[{"utt_id": utt_id, "_file": reader.name, "check": c.check,
               "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err, "atol": atol,
               "rtol": rtol, "result": "PASS" if c.passed else "FAIL"} for c in checks],
    )

