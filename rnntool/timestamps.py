"""Token and word times, confidences and emission delay: what ``rnntool timestamps`` computes.

Everything here reads an utterance's ``Alignment`` (``align.py``: the Viterbi
path of the reference transcript and the exact lattice posteriors, on the CPU
or CUDA engine, from a full or a lattice dump); nothing runs a second
forward-backward. Frames become seconds with the dump's frame shift (root
attribute ``frame_shift``, ``DumpReader.frame_shift``) or one given.

Definitions (``f_u`` is the frame at which the Viterbi path emits token ``u``,
``s`` the frame shift in seconds; frame ``t`` covers ``[t*s, (t+1)*s)``):

- a token's **start** is ``f_u * s`` and its **end** ``(f_u + 1) * s``: a token is
  emitted at one frame, and it occupies that frame. The end is the moment the
  model has committed to the token (the latency a streaming model is tuned
  against: icefall's delay-penalty measure takes the emission frames too), never
  stretched over the blank frames that follow (which would hand a pause to the
  word before it). Several tokens emitted at one frame share its start and end.
  Integer frames: ``start_frame = f_u``, ``end_frame = f_u + 1`` (exclusive).
- its **expected start** ``E[f_u] * s``: the posterior mean of its emission frame
  over all alignments (``Alignment.expected_frames``); expected end ``(E[f_u] + 1) * s``.
- its **frame posterior**: P(token u emitted at frame f_u | x, y), and its **window
  posterior**: P(emitted at a frame within ``f_u - k .. f_u + k``), both from the
  lattice (not a greedy path), probabilities in [0, 1].
- a **word** is a run of tokens (``word_groups``); its start is its first token's
  start, its end its last token's end (likewise the expected ones); its
  ``confidence`` the aggregate (``min`` by default, NeMo's default; ``mean``,
  ``prod``, ``max``) of its tokens' window posteriors, ``frame_confidence`` the
  same of their frame posteriors.

A TDT dump's alignment (``align.TDTAlignment``): ``f_u`` is the frame the token's
arc leaves on the best path over the duration lattice, and the token lasts
``n_u = max(d_u, 1)`` frames, ``d_u`` that arc's duration (the frames the model
says the token covers; a ``d = 0`` token still occupies its frame): end
``(f_u + n_u) * s``, ``end_frame = f_u + n_u``, expected end ``(E[f_u] + n_u) * s``.
The posteriors sum over the token's durations.

The same Viterbi frames come from every backend (ties break the same way), so
the times are identical on the CPU and CUDA engines and on a full dump and the
lattice dump made from it; the posteriors agree to float rounding.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .align import Alignment
    from .analysis import AlignedUtterance
    from .reader import DumpReader, LatticeUtterance, Utterance

WORD_MARKER = "\u2581"  # SentencePiece's word-start marker, "▁"
UNITS = ("word", "token")
AGGREGATES = ("min", "mean", "prod", "max")
DEFAULT_WINDOW = 2  # frames each side of the Viterbi frame for the window posterior
GROUPINGS = ("marker", "separator", "token")
# The frame shifts times are made with: a logit frame between a microsecond and a minute.
# Outside, the times are nonsense (1e300 s: 300-digit CTM fields; 1e-320 s: every time
# 0.000), and their millisecond offsets can overflow.
MIN_FRAME_SHIFT = 1e-6
MAX_FRAME_SHIFT = 60.0
# How far past an utterance's last frame (T x frame shift) a reference word may end:
# an encoder's subsampling drops a frame or two of the audio, an aligner may pad.
# A word ending later has times that are not relative to the utterance (a
# recording's CTM) or were measured against a wrong frame shift.
REF_SLACK = 1.0

WORD_FIELDS = ["utt_id", "word_index", "word", "start", "end", "duration", "start_frame",
               "end_frame", "expected_start", "expected_end", "confidence", "frame_confidence",
               "first_token", "n_tokens", "tokens"]
TOKEN_FIELDS = ["utt_id", "position", "token_id", "token", "word_index", "start", "end",
                "duration", "start_frame", "end_frame", "expected_frame", "expected_start",
                "expected_end", "frame_posterior", "window_posterior"]
DELAY_FIELDS = ["ref_word", "ref_start", "ref_end", "start_offset_ms", "end_offset_ms",
                "expected_start_offset_ms", "expected_end_offset_ms"]


# --------------------------------------------------------------------------- data
@dataclass
class TokenTime:
    """One token of an utterance: where the Viterbi path emits it, in frames and seconds,
    its expected emission time and its posteriors (see the module docstring).

    ``position``: 0-based index in the labels; ``word_index``: the word it belongs
    to (None for a word separator, or a marker token in no word); frames are
    integers (``end_frame`` exclusive), times seconds from the utterance's start,
    ``expected_frame`` a real frame index in ``[0, T-1]``, posteriors in [0, 1].
    """

    position: int
    token_id: int
    token: str
    word_index: int | None
    start_frame: int
    end_frame: int
    start: float
    end: float
    expected_frame: float
    expected_start: float
    expected_end: float
    frame_posterior: float
    window_posterior: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class WordTime:
    """One word: ``positions`` are its tokens' positions (in order); frames, times and
    expected times as its first token's start and its last token's end; ``confidence``
    and ``frame_confidence`` the aggregate of its tokens' window and frame posteriors."""

    index: int
    word: str
    positions: tuple[int, ...]
    start_frame: int
    end_frame: int
    start: float
    end: float
    expected_start: float
    expected_end: float
    confidence: float
    frame_confidence: float

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass
class UtteranceTimes:
    """The times of one utterance: ``T`` frames of ``frame_shift`` seconds (``duration``
    = T * frame_shift), ``U`` tokens, ``loss`` (-log P(y|x), nats), the dump's ``text``
    if any; ``tokens`` and ``words`` (empty when the loss is not finite: there is no
    alignment); ``problem``: why the loss cannot be true (``score.loss_problem``)."""

    utt_id: str
    T: int
    U: int
    frame_shift: float
    loss: float
    text: str | None
    tokens: list[TokenTime] = field(default_factory=list)
    words: list[WordTime] = field(default_factory=list)
    problem: str | None = None

    @property
    def duration(self) -> float:
        return self.T * self.frame_shift

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss)


def check_times_frame_shift(value, what: str = "frame_shift") -> float:
    """``value`` as the frame shift of times: ``dump.check_frame_shift`` (a finite real
    number > 0: TypeError, ValueError) and within [``MIN_FRAME_SHIFT``,
    ``MAX_FRAME_SHIFT``] seconds (ValueError naming ``what``)."""
    from .dump import check_frame_shift

    seconds = check_frame_shift(value, what)
    if not MIN_FRAME_SHIFT <= seconds <= MAX_FRAME_SHIFT:
        raise ValueError(f"{what} = {seconds!r} s is not a plausible frame shift: times need "
                         f"{MIN_FRAME_SHIFT:g} to {MAX_FRAME_SHIFT:g} seconds per logit frame")
    return seconds


def _check_unit(unit: str) -> str:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
    return unit


# --------------------------------------------------------------------------- words
def grouping_for(vocab: Sequence[str] | None, unit: str = "word",
                 word_sep: str | None = None, *, blank: int | None = None,
                 vocab_size: int | None = None) -> str:
    """How tokens group into words: ``"token"`` (one word per token) for
    ``unit="token"``; ``"separator"`` when ``word_sep`` is given; else ``"marker"``
    (SentencePiece's ``▁``) when some vocab entry starts with it, and ``"token"``
    when none does or there is no vocab (the caller may say so).

    ``blank`` (an index, negative counting from the end) and ``vocab_size`` (V),
    when given, check ``word_sep`` further: a separator that no label can hold
    would silently make each utterance one word.

    Raises ValueError for an unknown ``unit``, ``word_sep`` with ``unit="token"``,
    a ``word_sep`` that is no token of ``vocab`` (without a vocab tokens are named
    by their ids, so ``word_sep`` is an id, written as a plain decimal number
    ``0 <= id < vocab_size``), or one that names the blank.
    """
    _check_unit(unit)
    if unit == "token":
        if word_sep is not None:
            raise ValueError("a word separator groups tokens into words; it does not go with "
                             "unit 'token'")
        return "token"
    if word_sep is not None:
        if not isinstance(word_sep, str):
            raise TypeError(f"word_sep must be a token name (str), got {word_sep!r}")
        V = vocab_size if vocab_size is not None and vocab_size > 0 else None
        if vocab is not None:
            ids = [i for i, t in enumerate(vocab) if t == word_sep]
            if not ids:
                raise ValueError(f"word separator {word_sep!r} is not a token of the vocab")
        else:
            if not (word_sep.isascii() and word_sep.isdigit()) or str(int(word_sep)) != word_sep:
                raise ValueError(f"word separator {word_sep!r}: the dump has no vocab, so "
                                 "tokens are named by their ids; give the separator's id "
                                 "(a plain decimal number)")
            ids = [int(word_sep)]
            if V is not None and ids[0] >= V:
                raise ValueError(f"word separator {word_sep!r}: the dump has no vocab and no "
                                 f"token id {word_sep} (ids are 0 to {V - 1})")
        if blank is not None:
            n = V if V is not None else (len(vocab) if vocab is not None else None)
            b = blank % n if n and -n <= blank < n else blank
            if all(i == b for i in ids):
                raise ValueError(f"word separator {word_sep!r} is the blank (id {b}): labels "
                                 "never hold it")
        return "separator"
    if vocab is not None and any(t.startswith(WORD_MARKER) for t in vocab):
        return "marker"
    return "token"


def word_groups(tokens: Sequence[str], grouping: str = "marker",
                word_sep: str | None = None) -> list[tuple[str, list[int]]]:
    """``(word, token positions)`` of each word of the token sequence ``tokens`` (names).

    ``grouping`` (``GROUPINGS``): ``"marker"``: a token that starts with ``▁`` begins
    a word (tokens before the first such token form a word of their own); the word
    is its tokens joined with the markers removed, and a word left empty (a lone
    ``▁`` at the end) is dropped. ``"separator"``: the token ``word_sep`` ends a word
    and belongs to none; a word is its tokens joined as they are. ``"token"``: one
    word per token, the token's name as it is. Raises ValueError for an unknown
    ``grouping``, or ``"separator"`` without ``word_sep``.
    """
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {', '.join(GROUPINGS)}, got {grouping!r}")
    if grouping == "separator" and word_sep is None:
        raise ValueError("grouping 'separator' needs word_sep, the separator token's name")
    if grouping == "token":
        return [(t, [p]) for p, t in enumerate(tokens)]
    groups: list[tuple[str, list[int]]] = []
    current: list[int] = []

    def close():
        if current:
            text = "".join(tokens[p] for p in current)
            if grouping == "marker":
                text = text.replace(WORD_MARKER, "")
            if text:
                groups.append((text, list(current)))
        current.clear()

    for p, t in enumerate(tokens):
        if grouping == "separator":
            if t == word_sep:
                close()
                continue
        elif t.startswith(WORD_MARKER):
            close()
        current.append(p)
    close()
    return groups


def _aggregate(values: list[float], how: str) -> float:
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    if how == "mean":
        return math.fsum(values) / len(values)
    return math.prod(values)


# --------------------------------------------------------------------------- times
def utterance_times(alignment: Alignment, labels: np.ndarray, tokens: Sequence[str] | None, *,
                    frame_shift: float, utt_id: str = "", grouping: str = "marker",
                    word_sep: str | None = None, window: int = DEFAULT_WINDOW,
                    aggregate: str = "min", text: str | None = None,
                    problem: str | None = None) -> UtteranceTimes:
    """The times of one aligned utterance.

    ``alignment``: its ``Alignment`` (``align``/``align_compact``/``align_utterance``);
    ``labels`` ``(U,)``; ``tokens``: their names (None: the ids, as text);
    ``frame_shift``: seconds per frame (> 0); ``grouping``/``word_sep``: as
    ``word_groups`` (``grouping_for`` picks them); ``window``: k >= 0 frames each
    side for the window posterior; ``aggregate``: one of ``AGGREGATES``. An
    alignment whose loss is not finite gives no tokens or words.

    Raises ValueError for a ``frame_shift`` that is not a number of seconds in
    [``MIN_FRAME_SHIFT``, ``MAX_FRAME_SHIFT``] (TypeError for one that is no number,
    or an ``alignment`` that is no ``Alignment``),
    a bad ``window``, ``aggregate`` or ``grouping``, or ``labels``/``tokens`` that
    are not the alignment's ``U``.
    """
    frame_shift = check_times_frame_shift(frame_shift)
    if isinstance(window, bool) or not isinstance(window, int | np.integer) or window < 0:
        raise ValueError(f"window must be an integer >= 0 (frames), got {window!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
    from .align import Alignment

    if not isinstance(alignment, Alignment):
        raise TypeError(f"alignment must be an Alignment (align, align_compact), got "
                        f"{type(alignment).__name__}")
    al = alignment
    labels = np.asarray(labels)
    if labels.shape != (al.U,):
        raise ValueError(f"utterance {utt_id!r}: labels of shape {labels.shape} for an "
                         f"alignment of U = {al.U} tokens")
    if tokens is not None and (isinstance(tokens, str) or len(tokens) != al.U):
        raise ValueError(f"utterance {utt_id!r}: {len(tokens)} token names for an "
                         f"alignment of U = {al.U} tokens")
    word_groups([], grouping, word_sep)  # a bad grouping is an error, even with no tokens
    out = UtteranceTimes(utt_id=utt_id, T=al.T, U=al.U, frame_shift=frame_shift,
                         loss=al.loss, text=text, problem=problem)
    if not out.finite:
        return out
    names = list(tokens) if tokens is not None else [str(int(t)) for t in labels]
    groups = word_groups(names, grouping, word_sep)
    word_of: dict[int, int] = {p: w for w, (_, ps) in enumerate(groups) for p in ps}
    s = frame_shift
    k = int(window)
    durations = getattr(al, "token_durations", None)  # TDT: a token lasts max(d, 1) frames
    for u in range(al.U):
        f = int(al.frames[u])
        n = 1 if durations is None else max(int(durations[u]), 1)
        lo, hi = max(0, f - k), min(al.T, f + k + 1)
        win = float(min(1.0, max(0.0, math.fsum(al.emit_posteriors[lo:hi, u].tolist()))))
        e = float(al.expected_frames[u])
        out.tokens.append(TokenTime(
            position=u, token_id=int(labels[u]), token=names[u], word_index=word_of.get(u),
            start_frame=f, end_frame=f + n, start=f * s, end=(f + n) * s,
            expected_frame=e, expected_start=e * s, expected_end=(e + n) * s,
            frame_posterior=float(al.frame_posteriors[u]), window_posterior=win,
        ))
    for w, (word, ps) in enumerate(groups):
        first, last = out.tokens[ps[0]], out.tokens[ps[-1]]
        out.words.append(WordTime(
            index=w, word=word, positions=tuple(ps), start_frame=first.start_frame,
            end_frame=last.end_frame, start=first.start, end=last.end,
            expected_start=first.expected_start, expected_end=last.expected_end,
            confidence=_aggregate([out.tokens[p].window_posterior for p in ps], aggregate),
            frame_confidence=_aggregate([out.tokens[p].frame_posterior for p in ps], aggregate),
        ))
    return out


def times_of(aligned: AlignedUtterance, *, frame_shift: float, text: str | None = None,
             **kw) -> UtteranceTimes:
    """``utterance_times`` of an ``AlignedUtterance`` (``analysis.align_utterance``):
    its alignment, labels, token names and problem; ``kw`` as there."""
    return utterance_times(aligned.alignment, aligned.labels, aligned.tokens,
                           frame_shift=frame_shift, utt_id=aligned.utt_id, text=text,
                           problem=aligned.problem, **kw)


def timestamps(reader: DumpReader, utt: str | Utterance | LatticeUtterance, *,
               frame_shift: float | None = None, backend: str = "cpu", unit: str = "word",
               word_sep: str | None = None, window: int = DEFAULT_WINDOW,
               aggregate: str = "min") -> UtteranceTimes:
    """The times of one utterance of ``reader``, aligned on ``backend``: ``utt`` is its
    id, or what ``reader.read`` (a full dump) or ``reader.read_lattice`` (a lattice
    dump) returned for it.

    ``frame_shift``: seconds per frame, default the dump's (``reader.frame_shift``);
    ``unit``, ``word_sep``: how tokens group into words (``grouping_for``);
    ``window``, ``aggregate``: as ``utterance_times``.

    Raises ValueError when neither gives a frame shift or it is out of range
    (``check_times_frame_shift``), for bad options, TypeError for a ``reader`` or
    ``utt`` of another type, and ``DumpError`` for a dump's bad stored frame shift
    or an id it does not hold.
    """
    from .analysis import align_utterance
    from .reader import DumpReader, LatticeUtterance, Utterance

    if not isinstance(reader, DumpReader):
        raise TypeError(f"reader must be a DumpReader, got {type(reader).__name__}")
    if isinstance(utt, str):
        utt = reader.read_lattice(utt) if reader.kind == "lattice" else reader.read(utt)
    if not isinstance(utt, Utterance | LatticeUtterance):
        raise TypeError("utt must be an utterance id or what reader.read/read_lattice "
                        f"returned, got {type(utt).__name__}")

    what = "frame_shift"
    if frame_shift is None:
        frame_shift = reader.frame_shift
        if frame_shift is None:
            raise ValueError(f"{reader.name}: no frame shift: the dump has no root attribute "
                             "frame_shift; give one (seconds per logit frame)")
        what = f"{reader.name}: attribute frame_shift"
    frame_shift = check_times_frame_shift(frame_shift, what)
    grouping = grouping_for(reader.vocab, unit, word_sep, blank=reader.blank,
                            vocab_size=reader.vocab_size)
    aligned = align_utterance(reader, utt, backend=backend)
    return times_of(aligned, frame_shift=frame_shift, text=utt.info.attrs.get("text"),
                    grouping=grouping, word_sep=word_sep, window=window, aggregate=aggregate)


def units_of(times: UtteranceTimes, unit: str) -> list[TokenTime] | list[WordTime]:
    """The utterance's words (``unit="word"``), or its tokens (``unit="token"``);
    ValueError for another ``unit``."""
    return times.tokens if _check_unit(unit) == "token" else times.words


def unit_text(item: TokenTime | WordTime) -> str:
    return item.token if isinstance(item, TokenTime) else item.word


def unit_confidence(item: TokenTime | WordTime) -> float:
    """The confidence formats carry: a word's ``confidence``, a token's window posterior."""
    return item.window_posterior if isinstance(item, TokenTime) else item.confidence


# --------------------------------------------------------------------------- rows
def word_rows(times: UtteranceTimes) -> list[dict]:
    """One row per word (``WORD_FIELDS``)."""
    rows = []
    for w in times.words:
        names = [times.tokens[p].token for p in w.positions]
        rows.append({
            "utt_id": times.utt_id, "word_index": w.index, "word": w.word, "start": w.start,
            "end": w.end, "duration": w.duration, "start_frame": w.start_frame,
            "end_frame": w.end_frame, "expected_start": w.expected_start,
            "expected_end": w.expected_end, "confidence": w.confidence,
            "frame_confidence": w.frame_confidence, "first_token": w.positions[0],
            "n_tokens": len(w.positions), "tokens": " ".join(names),
        })
    return rows


def token_rows(times: UtteranceTimes) -> list[dict]:
    """One row per token (``TOKEN_FIELDS``)."""
    return [{
        "utt_id": times.utt_id, "position": t.position, "token_id": t.token_id,
        "token": t.token, "word_index": t.word_index, "start": t.start, "end": t.end,
        "duration": t.duration, "start_frame": t.start_frame, "end_frame": t.end_frame,
        "expected_frame": t.expected_frame, "expected_start": t.expected_start,
        "expected_end": t.expected_end, "frame_posterior": t.frame_posterior,
        "window_posterior": t.window_posterior,
    } for t in times.tokens]


# --------------------------------------------------------------------------- CTM
class CtmError(ValueError):
    """A bad CTM file: one line naming the file and the line number."""


@dataclass
class CtmWord:
    """One line of a CTM file: ``word`` from ``start`` for ``duration`` seconds."""

    word: str
    start: float
    duration: float
    line: int

    @property
    def end(self) -> float:
        return self.start + self.duration


_MAX_CTM_LINE = 1 << 16
_CTM_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def read_ctm(path: str | os.PathLike, name: str | None = None) -> dict[str, list[CtmWord]]:
    """The words of a CTM file (SCTK: ``<utt_id> <channel> <start> <duration> <word>
    [<confidence>]``, seconds), per utterance id, sorted by start (in file order
    for equal starts). Blank lines and ``;;`` comments are skipped, and so are a
    UTF-8 byte-order mark and CR line ends (files from Windows tools); the
    channel and confidence are not used. A file from elsewhere: a line that is not
    UTF-8, longer than 64 KiB, without five or six fields, or with a start,
    duration or confidence that is not a finite decimal number (``12``, ``0.5``,
    ``1e-3``; start and duration >= 0, their sum finite) is a ``CtmError`` naming
    ``name`` (default the path) and the line number; an unreadable file too
    (``CtmError``: "cannot read").
    """
    from .checks import show

    name = show(os.fspath(path) if name is None else name)
    words: dict[str, list[CtmWord]] = {}
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CtmError(f"{name}: cannot read the reference CTM ({e.strerror})") from None
    try:
        for n, raw in enumerate(iter(lambda: f.readline(_MAX_CTM_LINE + 1), b""), 1):
            if len(raw) > _MAX_CTM_LINE:
                raise CtmError(f"{name}: line {n} is longer than 64 KiB: not a CTM line")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise CtmError(f"{name}: line {n} is not UTF-8 text") from None
            fields = line.split()
            if not fields or fields[0].startswith(";;"):
                continue
            if len(fields) not in (5, 6):
                raise CtmError(f"{name}: line {n} has {len(fields)} fields; a CTM line has 5 or "
                               "6: utt_id channel start duration word [confidence]")
            values = []
            for what, text in zip(("start", "duration", "confidence"), fields[2:4] + fields[5:],
                                  strict=False):
                # Python's float() also takes "1_0", "٣" and " nan"; a CTM number is ASCII.
                v = float(text) if _CTM_NUMBER.fullmatch(text) else math.nan
                if not math.isfinite(v) or (what != "confidence" and v < 0):
                    raise CtmError(f"{name}: line {n}: {what} {show(text)!r} is not a finite "
                                   "number" + ("" if what == "confidence" else " >= 0"))
                values.append(v)
            if not math.isfinite(values[0] + values[1]):
                raise CtmError(f"{name}: line {n}: start {show(fields[2])!r} + duration "
                               f"{show(fields[3])!r} is not a finite number of seconds")
            words.setdefault(fields[0], []).append(CtmWord(fields[4], values[0], values[1], n))
    except OSError as e:
        raise CtmError(f"{name}: cannot read the reference CTM ({e.strerror})") from None
    finally:
        f.close()
    for ws in words.values():
        ws.sort(key=lambda w: w.start)
    return words


def check_ctm_field(value: str, what: str) -> None:
    """A CTM field must be one non-empty run of non-space characters: ValueError else."""
    if not value or len(value.split()) != 1 or value != value.strip():
        raise ValueError(f"{what} {value!r} cannot be a CTM field (empty, or it holds "
                         "whitespace)")


def ctm_decimals(frame_shift: float) -> int:
    """Decimals of the CTM's times: 3 (the millisecond), more for a frame shift under a
    millisecond (so that no frame rounds to a duration of 0)."""
    return max(3, math.ceil(-math.log10(frame_shift) - 1e-9))


def _fixed(ticks: int, decimals: int) -> str:
    """``ticks`` units of ``10**-decimals`` as a decimal number, exactly."""
    whole, frac = divmod(ticks, 10**decimals)
    return f"{whole}.{frac:0{decimals}d}"


def ctm_items(times: UtteranceTimes, unit: str = "word", channel: str = "1"
              ) -> list[tuple[float, str]]:
    """``(start, line)`` of each of the utterance's CTM lines (``<utt_id> <channel>
    <start> <duration> <word> <confidence>``, seconds to the millisecond
    (``ctm_decimals``), confidence to 4 decimals), sorted by start (position order
    for equal starts). The start and the end are rounded, and the duration is their
    difference, so that ``start + duration`` is the rounded end: a word that ends
    where the next begins does not overlap it in the CTM. Raises ValueError for an
    id, channel or word that cannot be a CTM field (empty, or holding whitespace),
    or an unknown ``unit``."""
    from .checks import show

    items = units_of(times, unit)
    check_ctm_field(times.utt_id, f"utterance {show(times.utt_id)}: the id")
    check_ctm_field(channel, "channel")
    d = ctm_decimals(times.frame_shift)
    out = []
    for it in sorted(items, key=lambda it: it.start):
        check_ctm_field(unit_text(it), f"utterance {show(times.utt_id)}: {unit}")
        a, b = round(it.start * 10**d), round(it.end * 10**d)
        out.append((it.start, f"{times.utt_id} {channel} {_fixed(a, d)} {_fixed(b - a, d)} "
                              f"{unit_text(it)} {unit_confidence(it):.4f}"))
    return out


def ctm_lines(times: UtteranceTimes, unit: str = "word", channel: str = "1") -> list[str]:
    """The utterance's CTM lines (``ctm_items`` without the starts)."""
    return [line for _, line in ctm_items(times, unit, channel)]


# --------------------------------------------------------------------------- delay
class WordMismatch(ValueError):
    """An utterance's words are not the reference's: one line naming both."""


def _same(a: str, b: str) -> bool:
    """Whether two words are the same ignoring case and Unicode's normal forms (a
    reference from elsewhere may spell "é" as e + combining accent): Unicode's
    NFKC_Casefold, as identifiers are compared caselessly."""
    return _folded(a) == _folded(b)


def _folded(word: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", word).casefold())


def check_words(utt_id: str, words: Sequence[str], ref: Sequence[CtmWord] | None,
                ref_name: str, duration: float | None = None) -> None:
    """Raise ``WordMismatch`` (one line naming the reference, the utterance and the first
    difference) unless ``words`` are the reference's words in order (compared ignoring
    case and Unicode normal forms: tokenizers often lower-case). With ``duration``
    (the utterance's, T x frame shift, seconds), a reference word that ends more than
    ``REF_SLACK`` seconds after it is a ``WordMismatch`` too: its times are not
    relative to the utterance, or the frame shift is not the model's."""
    from .checks import show

    theirs = [w.word for w in ref or []]
    where = f"{show(ref_name)}: utterance {show(utt_id)}"
    if not theirs and words:
        raise WordMismatch(f"{where}: no reference words, {len(words)} aligned (select "
                           "the utterances the reference covers with --utt or --utt-list)")
    for i, (a, b) in enumerate(zip(words, theirs, strict=False)):
        if not _same(a, b):
            raise WordMismatch(f"{where}: word {i + 1} is {show(a)!r} but the reference has "
                               f"{show(b)!r} ({len(words)} words aligned, {len(theirs)} in the "
                               "reference)")
    if len(words) != len(theirs):
        raise WordMismatch(f"{where}: {len(words)} words aligned but {len(theirs)} in the "
                           "reference (the first "
                           f"{min(len(words), len(theirs))} agree)")
    if duration is not None:
        for w in ref or []:
            if not w.end <= duration + REF_SLACK:
                raise WordMismatch(
                    f"{where}: reference word {show(w.word)!r} (line {w.line}) ends at "
                    f"{w.end:g} s, after the utterance's {duration:g} s (T x frame shift): "
                    "the reference's times must be relative to the utterance, and the "
                    "frame shift the model's")


def delay_rows(times: UtteranceTimes, ref: Sequence[CtmWord] | None, ref_name: str,
               unit: str = "word") -> list[dict]:
    """Per word (per token for ``unit="token"``) the reference word's times and the
    offsets hypothesis - reference in milliseconds (``DELAY_FIELDS``): of the start, the
    end, and of the expected start and end. Raises ``WordMismatch`` when the words are
    not the reference's, or a reference word ends after the utterance
    (``check_words``)."""
    items = units_of(times, unit)
    check_words(times.utt_id, [unit_text(it) for it in items], ref, ref_name, times.duration)
    rows = []
    for it, r in zip(items, ref or [], strict=False):
        rows.append({
            "ref_word": r.word, "ref_start": r.start, "ref_end": r.end,
            "start_offset_ms": 1000.0 * (it.start - r.start),
            "end_offset_ms": 1000.0 * (it.end - r.end),
            "expected_start_offset_ms": 1000.0 * (it.expected_start - r.start),
            "expected_end_offset_ms": 1000.0 * (it.expected_end - r.end),
        })
    return rows


SUMMARY_KEYS = ("start_offset_ms", "end_offset_ms", "expected_start_offset_ms",
                "expected_end_offset_ms")


def delay_summary(rows: Sequence[dict]) -> dict:
    """``{"count": n, key: stats}`` for each of ``SUMMARY_KEYS`` over ``rows``
    (``delay_rows``), stats ``{"mean", "median", "p90", "min", "max"}`` of the signed
    offsets in ms (hypothesis - reference: positive = emitted late; ``p90`` numpy's
    linear-interpolation 90th percentile), None when there are no rows."""
    out: dict = {"count": len(rows)}
    for key in SUMMARY_KEYS:
        v = np.array([r[key] for r in rows], np.float64)
        out[key] = None if not v.size else {
            "mean": float(v.mean()), "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)), "min": float(v.min()), "max": float(v.max()),
        }
    return out


# --------------------------------------------------------------------------- lhotse
def lhotse_supervision(times: UtteranceTimes, unit: str = "word",
                       custom: dict | None = None) -> dict:
    """The utterance as a lhotse ``SupervisionSegment`` dict (``to_dict``'s layout):
    ``id`` and ``recording_id`` the utterance id, ``start`` 0, ``duration`` T * frame
    shift, ``channel`` 0, ``text`` (the dump's, else the words joined by spaces; with
    ``unit="token"`` the tokens spelled out at their ``▁`` markers when they have
    them: a transcript, not a list of pieces), and ``alignment`` ``{"word":
    [[symbol, start, duration, score], ...], "token": [...]}`` (lhotse's
    ``AlignmentItem`` as a list; score the confidence: a word's ``confidence``, a
    token's window posterior). With ``unit="token"`` the "word" items are the
    tokens."""
    def items(seq):
        return [[unit_text(it), it.start, it.duration, unit_confidence(it)] for it in seq]

    units = units_of(times, unit)
    if times.text is not None:
        text = times.text
    elif unit == "token" and any(t.token.startswith(WORD_MARKER) for t in times.tokens):
        text = " ".join("".join(t.token for t in times.tokens).replace(WORD_MARKER, " ").split())
    else:
        text = " ".join(unit_text(it) for it in units)
    out = {"id": times.utt_id, "recording_id": times.utt_id, "start": 0.0,
           "duration": times.duration, "channel": 0, "text": text,
           "alignment": {"word": items(units), "token": items(times.tokens)}}
    if custom:
        out["custom"] = dict(custom)
    return out


# --------------------------------------------------------------------------- TextGrid
def _tier_intervals(spans: list[tuple[float, float, str]], xmax: float
                    ) -> list[tuple[float, float, str]]:
    """Intervals covering ``[0, xmax]`` without overlap: the spans (in order), empty
    intervals in the gaps. Spans that overlap (a safeguard: ``frame_shares`` gives
    none) are run together into one stretch, shared evenly among them in order: a
    TextGrid tier cannot hold overlapping intervals."""
    clusters: list[list[tuple[float, float, str]]] = []
    end = -math.inf
    for sp in spans:
        if clusters and sp[0] < end:
            clusters[-1].append(sp)
            end = max(end, sp[1])
        else:
            clusters.append([sp])
            end = sp[1]
    out = []
    at = 0.0
    for c in clusters:
        c0, c1 = c[0][0], max(sp[1] for sp in c)
        if c0 > at:
            out.append((at, c0, ""))
        n = len(c)
        bounds = [c0] + [c0 + (c1 - c0) * i / n for i in range(1, n)] + [c1]
        out += [(bounds[i], bounds[i + 1], sp[2]) for i, sp in enumerate(c)]
        at = c1
    if at < xmax:
        out.append((at, xmax, ""))
    return out


def _praat_string(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def frame_shares(times: UtteranceTimes) -> list[tuple[float, float]]:
    """``(start, end)`` in seconds of each token as a TextGrid interval: the token's own
    ``[start, end)`` (one frame for RNN-T, ``max(d, 1)`` frames for TDT), except that
    the n tokens emitted in one frame split its first frame evenly, in order (the
    last of them then runs on to its end). Shares never overlap (an end past the next
    token's start is cut there, a safeguard: no alignment makes one), so they can be
    drawn as intervals (``textgrid``)."""
    s = times.frame_shift
    tokens = times.tokens
    out = []
    i = 0
    while i < len(tokens):
        f = tokens[i].start_frame
        k = i
        while k < len(tokens) and tokens[k].start_frame == f:
            k += 1
        n = k - i
        for j, t in enumerate(tokens[i:k]):
            start = t.start if j == 0 else (f + j / n) * s
            end = t.end if j == n - 1 else (f + (j + 1) / n) * s
            if k < len(tokens):
                end = min(end, tokens[k].start)
            out.append((start, max(end, start)))
        i = k
    return out


def textgrid(times: UtteranceTimes) -> str:
    """The utterance as a Praat TextGrid (long text format): interval tiers ``words``
    and ``tokens`` over ``[0, T * frame shift]``, the gaps between items as empty
    intervals. Each token is drawn from its start to its end, as the other formats
    give them (a TDT token over its ``max(d, 1)`` frames), and each word from its
    first token's start to its last token's end; but a tier cannot hold overlapping
    intervals, so the tokens emitted in one frame split that frame evenly, in order
    (``frame_shares``), and a word whose first token is emitted in the frame of the
    previous word's last token starts in that frame, as its start says. The exact
    times are in the other formats."""
    xmax = times.duration
    shares = frame_shares(times)
    tiers = [("words", [(shares[w.positions[0]][0], shares[w.positions[-1]][1], w.word)
                        for w in times.words]),
             ("tokens", [(a, b, t.token) for (a, b), t in zip(shares, times.tokens,
                                                              strict=True)])]
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "",
             "xmin = 0", f"xmax = {xmax!r}", "tiers? <exists>", f"size = {len(tiers)}",
             "item []:"]
    for i, (name, spans) in enumerate(tiers, 1):
        intervals = _tier_intervals(spans, xmax)
        lines += [f"    item [{i}]:", '        class = "IntervalTier"',
                  f"        name = {_praat_string(name)}", "        xmin = 0",
                  f"        xmax = {xmax!r}", f"        intervals: size = {len(intervals)}"]
        for j, (a, b, text) in enumerate(intervals, 1):
            lines += [f"        intervals [{j}]:", f"            xmin = {a!r}",
                      f"            xmax = {b!r}", f"            text = {_praat_string(text)}"]
    return "\n".join(lines) + "\n"


__all__ = [
    "AGGREGATES", "DEFAULT_WINDOW", "DELAY_FIELDS", "GROUPINGS", "TOKEN_FIELDS", "UNITS",
    "WORD_FIELDS", "WORD_MARKER", "CtmError", "CtmWord", "TokenTime", "UtteranceTimes",
    "WordMismatch", "WordTime", "check_words", "ctm_items", "ctm_lines", "delay_rows",
    "delay_summary", "frame_shares", "grouping_for", "lhotse_supervision", "read_ctm",
    "textgrid", "MAX_FRAME_SHIFT", "MIN_FRAME_SHIFT", "REF_SLACK", "check_times_frame_shift",
    "ctm_decimals",
    "timestamps", "times_of", "token_rows", "units_of", "utterance_times", "word_groups",
    "word_rows",
]
