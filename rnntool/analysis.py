"""What ``rnntool inspect``, ``align`` and ``plot`` compute, as library functions.

Each takes an open ``DumpReader`` (and one ``Utterance`` read from it) and
returns a typed result: facts, rows and the problems found, never printed.
The command line renders them; a notebook can use them as they are.

- ``inspect_dump(reader) -> DumpReport``: a dump's facts and every problem in it.
- ``align_utterance(reader, utt, backend=...) -> AlignedUtterance``: an
  utterance's alignment, its rows (one per token) and whether its loss can be
  true; with ``grad_norms=True`` also the per-node gradient norms ``plot`` draws.

torch is imported only by the functions that run the engine on tensors
(``align_utterance``, ``gradient_norms``): ``inspect_dump`` scores on the CPU
engine without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .align import Alignment
    from .reader import DumpReader, LatticeUtterance, Utterance

ALIGN_FIELDS = ["utt_id", "position", "token_id", "token", "frame", "expected_frame",
                "frame_posterior", "loss", "best_log_prob"]
# A TDT dump's align rows: one per arc of the best path, tokens and blanks (``kind``),
# each with the frame it leaves and its duration (frames the path advances with it).
ALIGN_TDT_FIELDS = ["utt_id", "arc", "kind", "position", "token_id", "token", "frame",
                    "duration", "expected_frame", "frame_posterior", "loss", "best_log_prob"]


def align_fields(model_kinds) -> list[str]:
    """``align``'s columns for dumps of these model kinds: ``ALIGN_FIELDS``, or
    ``ALIGN_TDT_FIELDS`` when any is ``"tdt"`` (RNN-T rows then leave ``arc``, ``kind``
    and ``duration`` empty)."""
    return ALIGN_TDT_FIELDS if "tdt" in set(model_kinds) else ALIGN_FIELDS


# --------------------------------------------------------------------------- inspect
@dataclass
class DumpReport:
    """What ``inspect`` finds in one dump.

    ``kind``: ``"full"`` (logits) or ``"lattice"`` (a lattice dump's compact arrays);
    ``model_kind``: ``"rnnt"`` or ``"tdt"``, ``durations`` a TDT dump's duration set
    (None for RNN-T; ``inspect`` adds both as columns after ``kind``).
    ``T``, ``U``, ``V``: ``(min, max)`` over the utterances that could be read
    (None when none could); ``dtypes``: their logits' dtypes, sorted;
    ``with_stored_loss``/``with_grads``: how many carry a trainer's loss or
    gradient. ``problems``: one line each (naming the file and the utterance),
    in file order, every problem of an utterance together.
    """

    file: str
    layout: str
    kind: str
    blank: int
    vocab_size: int
    has_vocab: bool
    input_kind: str
    utterances: int
    T: tuple[int, int] | None
    U: tuple[int, int] | None
    V: tuple[int, int] | None
    dtypes: list[str]
    with_stored_loss: int
    with_grads: int
    size_bytes: int
    problems: list[str] = field(default_factory=list)
    model_kind: str = "rnnt"
    durations: tuple[int, ...] | None = None

    def facts(self) -> dict:
        """The report as one row of ``inspect`` (``INSPECT_FIELDS``, in order): JSON-ready
        values, ranges as ``_min``/``_max`` columns (None when no utterance could be
        read), ``vocab`` a boolean, ``dtypes`` comma-separated, ``problems`` a count."""
        def ends(s):
            return (None, None) if s is None else s

        (t0, t1), (u0, u1), (v0, v1) = ends(self.T), ends(self.U), ends(self.V)
        return {
            "file": self.file, "kind": self.kind, "layout": self.layout, "blank": self.blank,
            "vocab_size": self.vocab_size, "vocab": self.has_vocab,
            "input_kind": self.input_kind, "utterances": self.utterances,
            "T_min": t0, "T_max": t1, "U_min": u0, "U_max": u1, "V_min": v0, "V_max": v1,
            "dtypes": ",".join(self.dtypes), "with_stored_loss": self.with_stored_loss,
            "with_grads": self.with_grads, "size_bytes": self.size_bytes,
            "problems": len(self.problems),
        }


INSPECT_FIELDS = ["file", "kind", "layout", "blank", "vocab_size", "vocab", "input_kind",
                  "utterances", "T_min", "T_max", "U_min", "U_max", "V_min", "V_max", "dtypes",
                  "with_stored_loss", "with_grads", "size_bytes", "problems"]


def inspect_dump(reader: DumpReader, on_utterance=None) -> DumpReport:
    """Read every utterance of ``reader`` and report what the dump holds and every problem.

    Problems: whatever makes an utterance unreadable (``DumpError``: bad labels,
    lengths or shapes; in a lattice dump, arrays that disagree in shape or hold NaN
    or +inf); NaN or +inf logits; for ``input_kind="log_probs"`` rows
    that do not normalise (``dump.log_prob_problem``); and a loss that is +inf or
    negative beyond rounding (``score.loss_problem``; a NaN loss comes from NaN
    logits, already reported). Scores on the CPU engine (no torch).
    ``on_utterance()`` is called after each utterance is read (progress).
    """
    from .dump import DumpError, log_prob_problem
    from .reader import show
    from .score import score_reader

    found: dict[str, list[str]] = {}  # utterance -> its problems, in file order
    infos = []
    for u in reader.utt_ids:
        found[u] = []
        if on_utterance is not None:
            on_utterance()
        if reader.kind == "lattice":  # shapes, dtypes, labels, NaN or +inf: DumpError
            try:
                lat = reader.read_lattice(u)
            except DumpError as e:
                found[u].append(str(e))
                continue
            infos.append(lat.info)
            why = lattice_prob_problem(lat, reader.input_kind)
            if why is not None:
                found[u].append(f"{reader.name}: utterance {show(u)}: {why}")
            continue
        try:
            one = reader.read(u)
            info, x = one.info, one.logits
            n_bad = int(np.count_nonzero(np.isnan(x) | np.isposinf(x)))
            if n_bad:
                found[u].append(f"{reader.name}: utterance {show(u)}: {n_bad} NaN or +inf logits")
            if reader.input_kind == "log_probs":
                # A TDT node holds two distributions: its tokens', then its durations'.
                parts = ([("", x)] if not info.D else
                         [("tokens: ", x[..., : info.V]), ("durations: ", x[..., info.V :])])
                for what, part in parts:
                    why = log_prob_problem(part)
                    if why is not None:
                        found[u].append(f"{reader.name}: utterance {show(u)}: {what}{why}")
            infos.append(info)
        except DumpError as e:
            found[u].append(str(e))
    for row in score_reader(reader, [i.utt_id for i in infos], backend="cpu"):
        if row["_problem"] is not None and not math.isnan(row["loss"]):
            found[row["utt_id"]].append(
                f"{reader.name}: utterance {show(row['utt_id'])}: {row['_problem']}")

    def span(vals):
        return (min(vals), max(vals)) if vals else None

    return DumpReport(
        file=reader.path,
        layout=reader.layout,
        kind=reader.kind,
        blank=reader.blank,
        vocab_size=reader.vocab_size,
        has_vocab=reader.vocab is not None,
        input_kind=reader.input_kind,
        utterances=len(reader),
        T=span([i.T for i in infos]),
        U=span([i.U for i in infos]),
        V=span([i.V for i in infos]),
        dtypes=sorted({str(i.dtype) for i in infos}),
        with_stored_loss=sum("loss" in i.attrs for i in infos),
        with_grads=sum(i.has_grads for i in infos),
        size_bytes=reader.file_size(),
        problems=[p for ps in found.values() for p in ps],
        model_kind=reader.model_kind,
        durations=reader.durations,
    )


def lattice_prob_problem(lat: LatticeUtterance, input_kind: str = "logits") -> str | None:
    """Whether a lattice dump's log-probs can be those of a distribution over the tokens:
    none above 0, and P(blank) + P(next label) at most 1, within rounding; a sentence
    saying how not, or None. (A loss can stay positive with such values, so score
    cannot see it.) Rounding: ``log_prob_tolerance`` of the stored dtype's epsilon,
    or float16's for a dump made from log-probs (their own precision is unknown)."""
    from .dump import log_prob_tolerance

    eps = np.finfo(np.float16 if input_kind == "log_probs" else lat.blank_lp.dtype).eps
    tol = log_prob_tolerance(float(eps), lat.info.V)
    b = lat.blank_lp.astype(np.float64)
    e = lat.emit_lp.astype(np.float64)
    with np.errstate(invalid="ignore"):
        both = np.logaddexp(b[:, : e.shape[1]], e)
    # A log-prob above 0 first (the plainer fault), then the two probabilities' sum.
    for name, value in (("blank_lp", float(b.max(initial=-np.inf))),
                        ("emit_lp", float(e.max(initial=-np.inf))),
                        ("log(P(blank) + P(next label))", float(both.max(initial=-np.inf)))):
        if value > tol:
            return (f"{name} reaches {value:.3g} > 0 (tolerance {tol:.2g}): not the log-probs "
                    "of a distribution over the tokens")
    return None


# --------------------------------------------------------------------------- align / plot
@dataclass
class AlignedUtterance:
    """One utterance of a dump, aligned on the engine.

    ``alignment``: the engine's ``Alignment``; ``labels`` ``(U,)`` and their
    ``tokens`` (the dump's vocab names, None without a vocab); ``problem``: why
    the loss cannot be true (``score.loss_problem``), None if it can;
    ``grad_norm`` ``(T, U+1)``: ``||d loss / d logits[t, u, :]||``, when asked for
    and the loss is finite; ``without_grad_norms``: True for a TDT lattice dump's
    utterance, whose arrays give none (no ``log_p2_others``; plot draws one panel).
    """

    utt_id: str
    labels: np.ndarray
    tokens: list[str] | None
    alignment: Alignment
    problem: str | None
    grad_norm: np.ndarray | None = None
    without_grad_norms: bool = False  # a TDT lattice dump's: none can be computed
    blank_name: str | None = None  # the blank's name in the vocab (TDT rows name it)

    @property
    def loss(self) -> float:
        return self.alignment.loss

    @property
    def best_log_prob(self) -> float:
        return self.alignment.best_log_prob

    @property
    def finite(self) -> bool:
        """Whether there is an alignment to show: False for a NaN or inf loss."""
        return math.isfinite(self.alignment.loss)

    @property
    def best_path_share(self) -> float:
        """The share of P(y|x) the single best path holds: ``exp(best_log_prob + loss)``."""
        return math.exp(self.alignment.best_log_prob + self.alignment.loss)

    def rows(self) -> list[dict]:
        """One row per token (``ALIGN_FIELDS``; ``loss`` and ``best_log_prob`` are the
        utterance's, on each of its rows); none when the loss is not finite."""
        if not self.finite:
            return []
        al = self.alignment
        if hasattr(al, "arcs"):
            return self._tdt_rows()
        return [{
            "utt_id": self.utt_id, "position": pos, "token_id": int(self.labels[pos]),
            "token": self.tokens[pos] if self.tokens else "",
            "frame": int(al.frames[pos]),
            "expected_frame": float(al.expected_frames[pos]),
            "frame_posterior": float(al.frame_posteriors[pos]),
            "loss": al.loss, "best_log_prob": al.best_log_prob,
        } for pos in range(al.U)]


    def _tdt_rows(self) -> list[dict]:
        """``ALIGN_TDT_FIELDS`` rows, one per arc of a TDT best path: ``kind`` "token" or
        "blank", ``position`` the u of the node the arc leaves (a token's 0-based
        position), ``frame`` the frame it leaves (a token's emission frame),
        ``duration`` its frames; ``expected_frame`` and ``frame_posterior`` for tokens."""
        al = self.alignment
        rows = []
        k = 0  # tokens seen
        for n, (t, u, token, d) in enumerate(al.arcs.tolist()):
            # A label arc raises u by one; the last arc is the blank that ends the path.
            is_token = n + 1 < len(al.arcs) and int(al.arcs[n + 1][1]) == u + 1
            row = {"utt_id": self.utt_id, "arc": n, "kind": "token" if is_token else "blank",
                   "position": u, "token_id": token, "frame": t, "duration": d,
                   "expected_frame": None, "frame_posterior": None,
                   "loss": al.loss, "best_log_prob": al.best_log_prob}
            if is_token:
                row["token"] = self.tokens[k] if self.tokens else ""
                row["expected_frame"] = float(al.expected_frames[k])
                row["frame_posterior"] = float(al.frame_posteriors[k])
                k += 1
            else:
                row["token"] = self.blank_name or ""
            rows.append(row)
        return rows


def _tensors(utt: Utterance, backend: str):
    """The utterance as a batch of one: logits, targets and lengths, on ``backend``'s device."""
    import torch

    from .devices import tensor_device

    device = tensor_device(backend)
    x = torch.from_numpy(utt.logits)[None].to(device)
    y = torch.from_numpy(utt.labels)[None].to(device)
    return x, y, torch.tensor([utt.info.T]), torch.tensor([utt.info.U])


def align_utterance(reader: DumpReader, utt: Utterance | LatticeUtterance, *,
                    backend: str = "cpu", grad_norms: bool = False) -> AlignedUtterance:
    """Align one utterance of ``reader`` (``reader.read``, or ``reader.read_lattice`` of
    a lattice dump) on ``backend``.

    With the dump's blank and input kind. ``grad_norms``: also the per-node
    gradient norms, when the loss is finite: from the engine's gradient of the
    logits (``gradient_norms``), or for a lattice dump from its arrays
    (``lattice_gradient_norms``). Warnings the engine raises
    (``ImpossibleLossWarning`` for an impossible loss) pass through.
    """
    from .align import align, align_compact
    from .reader import LatticeUtterance
    from .score import utterance_problem

    fused = reader.input_kind == "logits"
    if reader.model_kind == "tdt":
        return _align_tdt_utterance(reader, utt, backend=backend, grad_norms=grad_norms)
    if isinstance(utt, LatticeUtterance):
        T, U1 = utt.blank_lp.shape
        emit = np.full((T, U1), -np.inf, utt.blank_lp.dtype)
        emit[:, : U1 - 1] = utt.emit_lp
        (al,) = align_compact(utt.blank_lp[None], emit[None], _at_least_one(utt.labels)[None],
                              np.array([T]), np.array([U1 - 1]), backend=backend)
    else:
        (al,) = align(*_tensors(utt, backend), blank=reader.blank, fused_log_softmax=fused,
                      backend=backend)
    aligned = AlignedUtterance(
        utt_id=utt.info.utt_id, labels=utt.labels,
        tokens=[reader.vocab[int(t)] for t in utt.labels] if reader.vocab else None,
        alignment=al, problem=utterance_problem(reader, utt.info, al.loss),
    )
    if grad_norms and aligned.finite:
        if isinstance(utt, LatticeUtterance):
            aligned.grad_norm = lattice_gradient_norms(al, utt.blank_lp, utt.emit_lp,
                                                       utt.log_p2_others, fused=fused)
        else:
            aligned.grad_norm = gradient_norms(utt.logits, utt.labels, blank=reader.blank,
                                               fused=fused, backend=backend)
    return aligned


def _align_tdt_utterance(reader: DumpReader, utt: Utterance | LatticeUtterance, *,
                         backend: str, grad_norms: bool) -> AlignedUtterance:
    """``align_utterance`` of a TDT dump's utterance (``align.tdt_align``; a TDT lattice
    dump's: ``align.tdt_align_compact``); its gradient norms are over the V + D logits
    of each node (``tdt_gradient_norms``), none for a lattice dump's (it stores no
    ``log_p2_others``)."""
    from .align import tdt_align
    from .reader import LatticeUtterance
    from .score import utterance_problem

    fused = reader.input_kind == "logits"
    if isinstance(utt, LatticeUtterance):
        from .align import tdt_align_compact

        T, U1 = utt.blank_lp.shape
        emit = np.full((T, U1), -np.inf, utt.blank_lp.dtype)
        emit[:, : U1 - 1] = utt.emit_lp
        (al,) = tdt_align_compact(utt.blank_lp[None], emit[None], utt.dur_lp[None],
                                  _at_least_one(utt.labels)[None], np.array([T]),
                                  np.array([U1 - 1]), durations=reader.durations,
                                  blank=reader.blank % utt.info.V, backend=backend)
    else:
        x, y, t_len, u_len = _tensors(utt, backend)
        if y.shape[1] == 0:
            y = y.new_zeros((1, 1))
        (al,) = tdt_align(x, y, t_len, u_len, durations=reader.durations, blank=reader.blank,
                          fused_log_softmax=fused, backend=backend)
    vocab = reader.vocab
    aligned = AlignedUtterance(
        utt_id=utt.info.utt_id, labels=utt.labels,
        tokens=[vocab[int(t)] for t in utt.labels] if vocab else None,
        alignment=al, problem=utterance_problem(reader, utt.info, al.loss),
        blank_name=vocab[reader.blank % utt.info.V] if vocab else None,
    )
    # A TDT lattice dump stores no log_p2_others: no gradient norms (plot leaves
    # that panel out).
    aligned.without_grad_norms = isinstance(utt, LatticeUtterance)
    if grad_norms and aligned.finite and not isinstance(utt, LatticeUtterance):
        aligned.grad_norm = tdt_gradient_norms(utt.logits, utt.labels,
                                               durations=reader.durations,
                                               blank=reader.blank, fused=fused, backend=backend)
    return aligned


def tdt_gradient_norms(logits: np.ndarray, targets: np.ndarray, *, durations, blank: int,
                       fused: bool = True, backend: str = "cpu") -> np.ndarray:
    """``(T, U+1)`` float64: at each node the norm of the TDT loss's gradient over the
    node's ``V + D`` logits (``logits`` ``(T, U+1, V + D)``), from ``tdt_loss``'s
    backward on ``backend``."""
    import warnings

    import torch

    from .devices import tensor_device
    from .engine import ImpossibleLossWarning
    from .tdt import tdt_loss

    device = tensor_device(backend)
    x = torch.from_numpy(np.ascontiguousarray(logits))[None].to(device).requires_grad_(True)
    U = int(targets.shape[0])
    y = torch.from_numpy(_at_least_one(targets))[None].to(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ImpossibleLossWarning)
        loss = tdt_loss(x, y, torch.tensor([logits.shape[0]]), torch.tensor([U]),
                        durations=durations, blank=blank, reduction="sum",
                        fused_log_softmax=fused, backend=backend)
        (grad,) = torch.autograd.grad(loss, x)
    return grad[0].double().norm(dim=-1).cpu().numpy()


def _at_least_one(labels: np.ndarray) -> np.ndarray:
    """Labels as a ``(max(U, 1),)`` int64 row (the kernels want a non-empty targets row)."""
    return labels.astype(np.int64) if labels.size else np.zeros(1, np.int64)


def lattice_gradient_norms(al: Alignment, blank_lp: np.ndarray, emit_lp: np.ndarray,
                           log_p2_others: np.ndarray, *, fused: bool = True) -> np.ndarray:
    """``(T, U+1)`` float64: the per-node gradient norm ``||d loss / d logits[t, u, :]||``
    from a lattice dump's arrays (``blank_lp``, ``log_p2_others`` ``(T, U+1)``,
    ``emit_lp`` ``(T, U)``) and the utterance's alignment ``al``; no logits needed.

    At a node, with arc posteriors g_b (blank) and g_y (next label) and occupancy
    occ = g_b + g_y, the gradient is ``occ * p_v - g_b [v = blank] - g_y [v = y]``, so

        ||g||^2 = occ^2 * S + (occ * p_blank - g_b)^2 + (occ * p_y - g_y)^2

    with S the sum of p_v^2 over the other v (the stored ``log_p2_others``). This
    equals the issue's ``occ^2 * sum_v p_v^2 - 2 occ (p_blank g_b + p_y g_y) + g_b^2
    + g_y^2``, written term by term: each term is non-negative, so nothing cancels
    where the distribution is peaked (that form loses all digits there). For
    log-prob input (``fused=False``) the gradient has no softmax term:
    ``||g||^2 = g_b^2 + g_y^2``.
    """
    T, U1 = blank_lp.shape
    g_b = al.blank_posteriors
    g_y = np.zeros((T, U1))
    g_y[:, : U1 - 1] = al.emit_posteriors
    if not fused:
        return np.sqrt(g_b**2 + g_y**2)
    occ = g_b + g_y
    p_b = np.exp(blank_lp.astype(np.float64))
    p_y = np.zeros((T, U1))
    p_y[:, : U1 - 1] = np.exp(emit_lp.astype(np.float64))
    others = np.exp(log_p2_others.astype(np.float64))
    return np.sqrt(occ**2 * others + (occ * p_b - g_b) ** 2 + (occ * p_y - g_y) ** 2)


def gradient_norms(logits: np.ndarray, targets: np.ndarray, *, blank: int, fused: bool = True,
                   backend: str = "cpu") -> np.ndarray:
    """``(T, U+1)`` float64: at each lattice node the norm over V of the engine's gradient
    of the utterance's loss, ``||d loss / d logits[t, u, :]||`` (``logits`` ``(T, U+1, V)``)."""
    from .gradcheck import utterance_gradient

    grad = utterance_gradient(logits, targets, blank=blank, fused=fused, backend=backend)
    return grad.double().norm(dim=-1).cpu().numpy()
