"""Float64 reference for the RNN-T loss: slow, obvious, and independent of the kernels.

This is the oracle the tests compare every backend with, and the one
``grad-check`` trusts. It follows Graves (2012) literally: a double loop over the
T x (U+1) lattice in float64 torch scalars, differentiated by torch autograd.
``reference_loss_value`` spells the same loss again in numpy, without autograd,
for finite differences. Nothing here is fast; nothing here shares code with
``cpu.py``, ``cuda.py`` or ``lattice.py``.
"""

from __future__ import annotations

import numpy as np
import torch

_NEG_INF = float("-inf")


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # torch.logaddexp's gradient is NaN when both sides are -inf; an
    # unreachable node must just contribute nothing.
    if a.item() == _NEG_INF:
        return b
    if b.item() == _NEG_INF:
        return a
    return torch.logaddexp(a, b)


def reference_utterance_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    blank: int = 0,
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """``-log P(y|x)`` of one utterance, differentiable by autograd.

    logits: ``(T, U+1, V)`` float64 (exactly the utterance, no padding).
    labels: ``(U,)`` integers, none equal to ``blank``.
    fastemit_lambda: FastEmit (Yu et al. 2021) by its definition: the value is
    unchanged and the gradient through every emission log-prob is scaled by
    ``1 + lambda``.
    """
    T, U1, V = logits.shape
    U = U1 - 1
    if labels.numel() != U:
        raise ValueError(f"labels has {labels.numel()} entries, logits imply U={U}")
    logp = torch.log_softmax(logits, dim=-1) if fused_log_softmax else logits
    blank = blank % V

    def blank_lp(t: int, u: int) -> torch.Tensor:
        return logp[t, u, blank]

    def emit_lp(t: int, u: int) -> torch.Tensor:
        lp = logp[t, u, int(labels[u])]
        if fastemit_lambda:
            # Same value, gradient scaled by (1 + lambda).
            lp = lp * (1.0 + fastemit_lambda) - lp.detach() * fastemit_lambda
        return lp

    neg_inf = torch.tensor(_NEG_INF, dtype=logits.dtype)
    alpha = [[neg_inf] * U1 for _ in range(T)]
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                alpha[t][u] = torch.zeros((), dtype=logits.dtype)
                continue
            from_left = alpha[t - 1][u] + blank_lp(t - 1, u) if t > 0 else neg_inf
            from_below = alpha[t][u - 1] + emit_lp(t, u - 1) if u > 0 else neg_inf
            alpha[t][u] = _logaddexp(from_left, from_below)
    return -(alpha[T - 1][U] + blank_lp(T - 1, U))


def reference_rnnt_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """Per-utterance losses ``(B,)`` in float64 for a padded batch.

    logits: ``(B, T, U+1, V)``; targets: ``(B, S)``; lengths: ``(B,)``.
    Padding is sliced away before each utterance is scored, so it gets no
    gradient. The result is differentiable w.r.t. ``logits`` when it requires grad.
    """
    losses = []
    for b in range(logits.shape[0]):
        T_b = int(logit_lengths[b])
        U_b = int(target_lengths[b])
        losses.append(
            reference_utterance_loss(
                logits[b, :T_b, : U_b + 1],
                targets[b, :U_b],
                blank=blank,
                fused_log_softmax=fused_log_softmax,
                fastemit_lambda=fastemit_lambda,
            )
        )
    return torch.stack(losses)


def reference_gradients(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance losses ``(B,)`` and ``d loss_b / d logits`` ``(B, T, U+1, V)``, float64.

    Each utterance's gradient is of its own loss only, unscaled by any reduction.
    """
    x = logits.detach().to(torch.float64).requires_grad_(True)
    losses = reference_rnnt_loss(
        x, targets, logit_lengths, target_lengths, blank, fused_log_softmax, fastemit_lambda
    )
    finite = torch.isfinite(losses)
    if bool(finite.any()):
        losses[finite].sum().backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return losses.detach(), grad


def reference_viterbi(
    logits: torch.Tensor, labels: torch.Tensor, blank: int = 0, fused_log_softmax: bool = True
) -> tuple[float, list[int]]:
    """Best alignment of one utterance in float64: ``(log-prob, emission frame of each label)``.

    logits ``(T, U+1, V)``, labels ``(U,)``. Plain double loop; on ties the
    blank arc (from (t-1, u)) wins, the rule every backend follows.
    """
    T, U1, V = logits.shape
    logp = torch.log_softmax(logits.double(), -1) if fused_log_softmax else logits.double()
    blank = blank % V
    neg_inf = float("-inf")
    delta = [[neg_inf] * U1 for _ in range(T)]
    came_by_emit = [[False] * U1 for _ in range(T)]
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                delta[0][0] = 0.0
                continue
            a = delta[t - 1][u] + float(logp[t - 1, u, blank]) if t > 0 else neg_inf
            e = delta[t][u - 1] + float(logp[t, u - 1, int(labels[u - 1])]) if u > 0 else neg_inf
            if u > 0 and (t == 0 or e > a):
                delta[t][u], came_by_emit[t][u] = e, True
            else:
                delta[t][u] = a
    best = delta[T - 1][U1 - 1] + float(logp[T - 1, U1 - 1, blank])
    frames = [0] * (U1 - 1)
    t, u = T - 1, U1 - 1
    while t > 0 or u > 0:
        if came_by_emit[t][u]:
            u -= 1
            frames[u] = t
        else:
            t -= 1
    return best, frames


def reference_loss_value(logits: np.ndarray, labels: np.ndarray, blank: int, fused: bool) -> float:
    """``-log P(y|x)`` of one utterance in float64 numpy, plain loops, no autograd.

    logits ``(T, U+1, V)``, labels ``(U,)``. A second, independent spelling of
    ``reference_utterance_loss``, fast enough to be called twice per probe by
    ``grad-check``'s central finite differences.
    """
    x = np.asarray(logits, np.float64)
    if fused:
        m = x.max(-1, keepdims=True)
        x = x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))
    T, U1, _ = x.shape
    alpha = np.full((T, U1), -np.inf)
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                alpha[0, 0] = 0.0
                continue
            a = alpha[t - 1, u] + x[t - 1, u, blank] if t > 0 else -np.inf
            e = alpha[t, u - 1] + x[t, u - 1, labels[u - 1]] if u > 0 else -np.inf
            alpha[t, u] = np.logaddexp(a, e)
    return -(alpha[T - 1, U1 - 1] + x[T - 1, U1 - 1, blank])
