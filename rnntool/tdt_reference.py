"""Float64 reference for the Token-and-Duration Transducer (TDT) loss: slow, obvious, independent.

The TDT (Xu et al., ICML 2023, arXiv:2304.06795) joint emits per lattice node
``(t, u)`` ``V`` token logits (blank among them) followed by ``D`` duration
logits for the ascending duration set ``durations``; tokens and durations are
normalised separately: ``P(k|t,u) = log_softmax(token logits)[k]`` and
``Q(d|t,u) = log_softmax(duration logits)[d]`` (both in log space below).

The lattice, for ``T`` frames and ``U`` labels ``y_1 .. y_U`` (nodes
``0 <= t <= T-1``, ``0 <= u <= U``), path start ``(0, 0)``:

- a blank with duration ``d >= 1`` goes from ``(t, u)`` to ``(t+d, u)``, weight
  ``P(blank|t,u) - sigma + Q(d|t,u)``;
- the next label ``y_{u+1}`` with duration ``d >= 0`` goes from ``(t, u)`` (``u < U``)
  to ``(t+d, u+1)``, weight ``P(y_{u+1}|t,u) - sigma + Q(d|t,u)``;
- every arc must land on a node (``t + d <= T-1``), except that a blank from a node
  with ``u = U`` may land exactly on ``t + d = T``: that arc ends the path.

``-log P(y|x)`` is minus the log of the sum over all such paths of the exp of
the sum of their arc weights. ``sigma`` (logit under-normalisation, NeMo's
``sigma``) is thus subtracted once per arc, from blank and label token
log-probs alike; it is 0 by default. An utterance no path can explain (e.g.
``T = 1`` with ``U > 0`` and no duration 0) has loss ``+inf``.

This is the lattice of NeMo's TDT CUDA kernels (``compute_tdt_alphas_kernel`` /
``compute_tdt_betas_kernel`` in
``nemo/collections/asr/parts/numba/rnnt_loss/utils/cuda_utils/gpu_rnnt_kernel.py``)
and of their PyTorch reference ``TDTLossPytorch`` (``nemo/collections/asr/losses/
rnnt_pytorch.py``), read at NeMo commit 8cfedd7: duration-0 blanks are skipped,
labels may take duration 0, only blanks from ``u = U`` may end the path, and they
must land exactly on ``T`` (mass of a blank that would overshoot ``T`` is lost,
not absorbed). Two differences, neither in the lattice: ``TDTLossPytorch``
stands ``-1000.0`` in for ``-inf`` (an impossible utterance gets a finite loss of
about 1000 there, ``+inf`` here), and NeMo's CUDA loss draws, with probability
``omega``, the plain RNN-T loss instead: a training trick, not part of the loss,
left out here. NeMo accepts duration sets without 0 (its tests use
``[1, 2, 3, 4, 5]``); so does this reference (it only asks for distinct,
ascending, non-negative integers), while ``rnntool.tdt_loss`` asks for 0 and 1.

The gradient (what the kernels must reproduce, and what the tests check
autograd against): with ``occ(t, u)`` the posterior probability that the path
visits ``(t, u)``, ``P_blank(t, u)`` / ``P_label(t, u)`` the summed posteriors of
the blank / label arcs leaving it and ``P_d(t, u)`` that of its arcs with
duration ``d`` (so ``occ = P_blank + P_label = sum_d P_d``), the gradient of the
loss w.r.t. token logit ``k`` is ``P(k) occ - [k = blank] P_blank - [k = y_{u+1}]
P_label`` and w.r.t. duration logit ``d`` it is ``Q(d) occ - P_d``; without the
fused log-softmax the ``P(k) occ`` and ``Q(d) occ`` terms go. ``sigma`` enters
only through the posteriors.

Like ``rnntool.reference`` (the RNN-T oracle), everything is plain Python loops
over float64 torch scalars, and gradients come from torch autograd; nothing
here shares code with the kernels. ``tdt_brute_force_loss`` enumerates every
path explicitly, for tiny lattices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

_NEG_INF = float("-inf")

Arc = tuple[int, int, int, int]
"""One arc of a path: ``(t, u, token, duration)`` -- it leaves node ``(t, u)``,
emits ``token`` (the label ``y_{u+1}``'s vocabulary index, or the blank index)
and advances ``duration`` frames."""


# --------------------------------------------------------------------------- helpers
def _logsumexp(terms: list[torch.Tensor]) -> torch.Tensor:
    """log(sum(exp(terms))) of 0-d tensors, ``-inf`` for none.

    ``-inf`` terms are dropped first: torch's gradient is NaN when every input
    is ``-inf``, and an unreachable node or an impossible arc must just
    contribute nothing (zero gradient).
    """
    live = [x for x in terms if x.item() != _NEG_INF]
    if not live:
        return torch.tensor(_NEG_INF, dtype=torch.float64)
    if len(live) == 1:
        return live[0]
    return torch.logsumexp(torch.stack(live), dim=0)


def _check_durations(durations: Sequence[int]) -> list[int]:
    ds = [int(d) for d in durations]
    if not ds or any(d != float(x) for d, x in zip(ds, durations, strict=True)):
        raise ValueError(f"durations must be a non-empty list of integers, got {list(durations)!r}")
    if any(d < 0 for d in ds) or any(a >= b for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"durations must be distinct, ascending and >= 0, got {ds!r}")
    return ds


def _split(
    logits: torch.Tensor, durations: list[int], blank: int, sigma: float, fused: bool
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(token log-probs minus sigma (T, U+1, V), duration log-probs (T, U+1, D), blank)``."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be (T, U+1, V+D), got shape {tuple(logits.shape)}")
    D = len(durations)
    V = logits.shape[-1] - D
    if V < 1:
        raise ValueError(
            f"logits' last dim {logits.shape[-1]} leaves no token logits for D={D} durations")
    if not -V <= blank < V:
        raise ValueError(f"blank {blank} is outside the V={V} token logits")
    x = logits.to(torch.float64)
    tok, dur = x[..., :V], x[..., V:]
    if fused:
        tok = torch.log_softmax(tok, dim=-1)
        dur = torch.log_softmax(dur, dim=-1)
    return tok - float(sigma), dur, blank % V


def _check_labels(labels: torch.Tensor, U: int, V: int, blank: int) -> list[int]:
    ys = [int(y) for y in labels.reshape(-1)]
    if len(ys) != U:
        raise ValueError(f"labels has {len(ys)} entries, logits imply U={U}")
    for u, y in enumerate(ys):
        if not 0 <= y < V or y == blank:
            raise ValueError(f"label {u} is {y}: not a token in [0, {V}) other than blank {blank}")
    return ys


def _float_lattice(logits: torch.Tensor, labels: torch.Tensor, durations: Sequence[int],
                   blank: int, sigma: float, fused: bool):
    """``(durations, token log-probs minus sigma [T][U+1][V], duration log-probs
    [T][U+1][D], labels, blank in [0, V))`` as checked Python floats and ints, for
    the loops without autograd (best path, path enumeration)."""
    ds = _check_durations(durations)
    with torch.no_grad():
        tok, dur, blank = _split(logits, ds, blank, sigma, fused)
    _, U1, V = tok.shape
    ys = _check_labels(labels, U1 - 1, V, blank)
    return ds, tok.tolist(), dur.tolist(), ys, blank


# --------------------------------------------------------------------------- loss
def tdt_reference_utterance_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    durations: Sequence[int],
    blank: int,
    sigma: float = 0.0,
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """``-log P(y|x)`` of one TDT utterance (nats), a 0-d float64 tensor differentiable by autograd.

    logits: ``(T, U+1, V+D)``, exactly the utterance (no padding), ``T >= 1``:
        per node the ``V`` token logits, then the ``D = len(durations)`` duration
        logits (NeMo's joint layout). Taken in float64.
    labels: ``(U,)`` integers in ``[0, V)``, none equal to ``blank``.
    durations: distinct ascending integers ``>= 0`` (e.g. ``[0, 1, 2, 3, 4]``).
    blank: index of blank among the ``V`` tokens; negative counts from the end
        (``-1`` = ``V-1``, NeMo's TDT blank).
    sigma: subtracted from the token log-prob of every arc (blank and label).
    fused_log_softmax: if True, ``P`` and ``Q`` are the log-softmaxes of the token
        and duration logits; if False, BOTH parts are taken as log-probs already
        (token log-probs ``logits[..., :V]``, duration log-probs ``logits[..., V:]``,
        used as given, unnormalised if so) and the gradient is w.r.t. them.
    fastemit_lambda: FastEmit (Yu et al. 2021) as ``rnntool.reference`` defines
        it for RNN-T, "the gradient through every emission log-prob is scaled by
        ``1 + lambda``, the value unchanged", where the emission log-prob of a
        TDT label arc is its token log-prob ``P(y_{u+1}|t,u)``: its gradient is
        scaled by ``1 + lambda`` on every label arc (all durations), while
        blank arcs and the duration log-probs ``Q`` of every arc keep their
        plain gradient. This gives exactly the token and duration gradients of
        NeMo's TDT CUDA kernel with ``fastemit_lambda`` (``compute_tdt_grad_kernel``:
        FastEmit term on token logits only); NeMo's returned cost is then
        ``(1 + lambda)`` times the loss, this value is the plain loss.

    Returns ``+inf`` when no path exists. Raises ``ValueError`` for bad
    durations, a last dim that leaves no token logits, a blank out of range or
    labels that do not fit.
    """
    ds = _check_durations(durations)
    tok, dur, blank = _split(logits, ds, blank, sigma, fused_log_softmax)
    T, U1, V = tok.shape
    U = U1 - 1
    ys = _check_labels(labels, U, V, blank)
    if T < 1:
        raise ValueError("logits has T=0 frames")
    lam = float(fastemit_lambda)

    def emit_lp(t: int, u: int) -> torch.Tensor:
        # Token log-prob of label y_{u+1} at (t, u): the same value to the bit
        # (lp - lp.detach() is exactly 0), its gradient scaled by 1 + lambda.
        lp = tok[t, u, ys[u]]
        if lam and lp.item() != _NEG_INF:
            lp = lp + lam * (lp - lp.detach())
        return lp

    # alpha[t][u]: log of the summed weight of all partial paths from (0, 0) to (t, u).
    alpha: list[list[torch.Tensor]] = [[None] * U1 for _ in range(T)]  # type: ignore[list-item]
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                alpha[0][0] = torch.zeros((), dtype=torch.float64)
                continue
            terms = []
            for i, d in enumerate(ds):
                if d >= 1 and t - d >= 0:  # a blank from (t-d, u)
                    terms.append(alpha[t - d][u] + tok[t - d, u, blank] + dur[t - d, u, i])
                if u >= 1 and t - d >= 0:  # label y_u from (t-d, u-1)
                    terms.append(alpha[t - d][u - 1] + emit_lp(t - d, u - 1) + dur[t - d, u - 1, i])
            alpha[t][u] = _logsumexp(terms)
    # The path ends with a blank from (T-d, U) landing exactly on frame T.
    final = [alpha[T - d][U] + tok[T - d, U, blank] + dur[T - d, U, i]
             for i, d in enumerate(ds) if d >= 1 and T - d >= 0]
    return -_logsumexp(final)


def tdt_reference_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    durations: Sequence[int],
    blank: int,
    sigma: float = 0.0,
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> torch.Tensor:
    """Per-utterance TDT losses ``(B,)`` in float64 for a padded batch.

    logits: ``(B, T, U+1, V+D)``; targets: ``(B, S)`` with ``S >= max U_b``;
    lengths: ``(B,)``, ``1 <= T_b <= T``, ``0 <= U_b <= U``. Each utterance is cropped
    to ``logits[b, :T_b, :U_b+1]`` and ``targets[b, :U_b]`` before it is scored, so
    padding gets no gradient. Differentiable w.r.t. ``logits`` when it requires
    grad. Other arguments as ``tdt_reference_utterance_loss``.
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, T, U+1, V+D), got shape {tuple(logits.shape)}")
    losses = []
    for b in range(logits.shape[0]):
        T_b = int(logit_lengths[b])
        U_b = int(target_lengths[b])
        if not 1 <= T_b <= logits.shape[1] or not 0 <= U_b < logits.shape[2]:
            raise ValueError(f"utterance {b}: lengths T={T_b}, U={U_b} do not fit logits "
                             f"{tuple(logits.shape)}")
        losses.append(
            tdt_reference_utterance_loss(
                logits[b, :T_b, : U_b + 1],
                targets[b, :U_b],
                durations=durations,
                blank=blank,
                sigma=sigma,
                fused_log_softmax=fused_log_softmax,
                fastemit_lambda=fastemit_lambda,
            )
        )
    return torch.stack(losses)


def tdt_reference_gradients(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logit_lengths: torch.Tensor,
    target_lengths: torch.Tensor,
    *,
    durations: Sequence[int],
    blank: int,
    sigma: float = 0.0,
    fused_log_softmax: bool = True,
    fastemit_lambda: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance losses ``(B,)`` and ``d loss_b / d logits`` ``(B, T, U+1, V+D)``, float64.

    Each utterance's gradient is of its own loss only, unscaled by any
    reduction, by ``torch.autograd.grad``; zero in the padding and for an
    utterance whose loss is not finite. There is no ``clamp`` here: rnntool's
    clamp clips each utterance's TOKEN gradient ``grads[..., :V]`` to ``[-c, c]``
    before any reduction scales it, and leaves duration gradients alone (as
    NeMo's TDT kernel clamps only its token gradients); apply that to these.
    Arguments as ``tdt_reference_loss``.
    """
    x = logits.detach().to(torch.float64).requires_grad_(True)
    losses = tdt_reference_loss(
        x, targets, logit_lengths, target_lengths, durations=durations, blank=blank,
        sigma=sigma, fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda,
    )
    finite = torch.isfinite(losses)
    grad = torch.zeros_like(x)
    if bool(finite.any()):
        (g,) = torch.autograd.grad(losses[finite].sum(), x, allow_unused=True)
        if g is not None:
            grad = g
    return losses.detach(), grad.detach()


# --------------------------------------------------------------------------- best path
def tdt_reference_viterbi(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    durations: Sequence[int],
    blank: int,
    sigma: float = 0.0,
    fused_log_softmax: bool = True,
) -> tuple[float, list[Arc]]:
    """Best path of one TDT utterance in float64: ``(log-prob, arcs)``.

    logits ``(T, U+1, V+D)``, labels ``(U,)``, other arguments as
    ``tdt_reference_utterance_loss``. ``arcs`` lists the path's arcs in order,
    each ``(t, u, token, duration)`` (see ``Arc``): a label arc has
    ``token = labels[u]`` and is emitted at frame ``t``; a blank arc has
    ``token = blank % V`` and jumps ``duration`` frames; the last arc is always a
    blank from ``u = U`` landing on ``t + duration = T``. The log-prob is the sum
    of the arcs' weights (``sigma`` included). ``(-inf, [])`` when no path exists.

    Ties: each node keeps the first best incoming arc in the order blank arcs by
    ascending duration, then label arcs by ascending duration (a later arc must
    be strictly better), so on ties a blank beats a label and a shorter jump a
    longer one -- RNN-T's "blank wins" rule; the final blank likewise takes the
    shortest duration among equals.
    """
    ds, lp_tok, lp_dur, ys, blank = _float_lattice(
        logits, labels, durations, blank, sigma, fused_log_softmax)
    T, U1, U = len(lp_tok), len(ys) + 1, len(ys)
    delta = [[_NEG_INF] * U1 for _ in range(T)]
    back: list[list[Arc | None]] = [[None] * U1 for _ in range(T)]
    delta[0][0] = 0.0
    for t in range(T):
        for u in range(U1):
            if t == 0 and u == 0:
                continue
            best, arc = _NEG_INF, None
            for i, d in enumerate(ds):  # blank arcs from (t-d, u)
                if d >= 1 and t - d >= 0:
                    s = delta[t - d][u] + lp_tok[t - d][u][blank] + lp_dur[t - d][u][i]
                    if s > best:
                        best, arc = s, (t - d, u, blank, d)
            for i, d in enumerate(ds):  # label arcs from (t-d, u-1)
                if u >= 1 and t - d >= 0:
                    y = ys[u - 1]
                    s = delta[t - d][u - 1] + lp_tok[t - d][u - 1][y] + lp_dur[t - d][u - 1][i]
                    if s > best:
                        best, arc = s, (t - d, u - 1, y, d)
            delta[t][u], back[t][u] = best, arc
    best, last = _NEG_INF, None
    for i, d in enumerate(ds):
        if d >= 1 and T - d >= 0:
            s = delta[T - d][U] + lp_tok[T - d][U][blank] + lp_dur[T - d][U][i]
            if s > best:
                best, last = s, (T - d, U, blank, d)
    if last is None:
        return _NEG_INF, []
    arcs = [last]
    t, u = last[0], last[1]
    while (t, u) != (0, 0):
        arc = back[t][u]
        arcs.append(arc)
        t, u = arc[0], arc[1]
    arcs.reverse()
    return best, arcs


# --------------------------------------------------------------------------- brute force
def tdt_enumerate_paths(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    durations: Sequence[int],
    blank: int,
    sigma: float = 0.0,
    fused_log_softmax: bool = True,
) -> Iterator[tuple[float, list[Arc]]]:
    """Every complete path of one TDT utterance, explicitly: ``(log-prob, arcs)`` each.

    Depth-first from ``(0, 0)`` over the arcs the lattice allows (module
    docstring), including arcs of weight ``-inf``. Exponential in ``T``: for tiny
    lattices only (``T <= 5``, ``U <= 2``). Arguments as ``tdt_reference_viterbi``.
    """
    ds, lp_tok, lp_dur, ys, blank = _float_lattice(
        logits, labels, durations, blank, sigma, fused_log_softmax)
    T, U = len(lp_tok), len(ys)

    def walk(t: int, u: int, lp: float, arcs: list[Arc]) -> Iterator[tuple[float, list[Arc]]]:
        for i, d in enumerate(ds):
            # Blank: to (t+d, u) inside the lattice, or out at exactly T from u = U.
            if d >= 1 and (t + d <= T - 1 or (u == U and t + d == T)):
                s = lp + lp_tok[t][u][blank] + lp_dur[t][u][i]
                arc = (t, u, blank, d)
                if t + d == T:
                    yield s, arcs + [arc]
                else:
                    yield from walk(t + d, u, s, arcs + [arc])
            # Label y_{u+1}: to (t+d, u+1) inside the lattice.
            if u < U and t + d <= T - 1:
                s = lp + lp_tok[t][u][ys[u]] + lp_dur[t][u][i]
                yield from walk(t + d, u + 1, s, arcs + [(t, u, ys[u], d)])

    yield from walk(0, 0, 0.0, [])


def tdt_brute_force_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    durations: Sequence[int],
    blank: int,
    sigma: float = 0.0,
    fused_log_softmax: bool = True,
) -> float:
    """``-log`` of the sum over every path, enumerated by ``tdt_enumerate_paths`` (float).

    For tiny lattices only. ``+inf`` when no path has a finite log-prob.
    Arguments as ``tdt_reference_viterbi``.
    """
    lps = [lp for lp, _ in tdt_enumerate_paths(
        logits, labels, durations=durations, blank=blank, sigma=sigma,
        fused_log_softmax=fused_log_softmax) if lp != _NEG_INF]
    if not lps:
        return math.inf
    m = max(lps)
    return -(m + math.log(math.fsum(math.exp(lp - m) for lp in lps)))
