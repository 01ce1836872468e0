"""Heatmaps of the T x (U+1) lattice: node occupancy with the best path, and gradient norms.

matplotlib, drawn without pyplot (no display, no global figure state). Long
utterances are reduced by taking the max over blocks of frames / label
positions, and the figure says so. ``build_figure`` returns the Figure (tests
inspect it); ``plot_utterance`` draws arrays into a file; ``save_png`` writes an
aligned utterance (``analysis.align_utterance(..., grad_norms=True)``) into a
directory, atomically, under a name made from its id.

Colour ranges are fixed, the same in every figure, so panels of different
utterances compare directly:

- occupancy ``P(path passes through (t, u))``: log10 from -8 to 0
  (``OCCUPANCY_RANGE``); occupancy never exceeds 1, smaller values (down to
  unreachable nodes, 0) take the bottom colour: the colour bar has an arrow
  at its lower end.
- gradient norm ``||d loss / d logits[t, u, :]||``: log10 from -8 to 0.5
  (``GRAD_NORM_RANGE``). The norm at a node is at most sqrt(2) times its
  occupancy (log10 sqrt(2) = 0.15, reached only by a node whose probability
  mass sits on neither of its two arcs), so nothing reaches the top; smaller
  values take the bottom colour, with an arrow at the lower end.

Token names label the rows (u = the number of labels emitted; row u is named
by the u-th label, row 0 by ∅). At most ``MAX_NAMES`` rows are named: beyond
that every k-th row is, and the axis says so ("every 3rd token named"). A name
is shown with control, format, private-use and unassigned characters escaped
(``\\n``, ``\\x00``, ``\\u200b``) and cut to ``NAME_CHARS`` characters (ending in
"…"). Names in a script the default font lacks (CJK, kana, Hangul, ...) are
drawn with an installed font that has every such character (preferring Noto
Sans CJK, Source Han Sans, WenQuanYi, Droid Sans Fallback, Noto Sans, then any
other, never a placeholder font that draws boxes; the choice is cached); with
no such font, a name the fonts cannot draw is shown as its token id ``#N``
instead, the axis says so, and no warning is printed. The utterance id in the
title is treated the same way, its undrawable characters escaped as ``\\uXXXX``.
"""

from __future__ import annotations

import functools
import math
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .analysis import AlignedUtterance

MAX_T = 1000  # displayed columns at most
MAX_U = 300  # displayed rows at most
MAX_NAMES = 40  # token names drawn on the u axis at most
NAME_CHARS = 16  # a longer token name is cut to this many characters, "…" included
ID_CHARS = 80  # likewise the utterance id in the title
OCCUPANCY_RANGE = (-8.0, 0.0)  # log10, fixed colour range of the occupancy panel
GRAD_NORM_RANGE = (-8.0, 0.5)  # log10, fixed colour range of the gradient-norm panel
EMPTY = "∅"  # the name of row 0: no label emitted yet

# Fonts tried first for characters the default font lacks, in this order (then any other).
PREFERRED_FONTS = (
    "Noto Sans CJK JP", "Noto Sans CJK SC", "Noto Sans CJK TC", "Noto Sans CJK KR",
    "Source Han Sans", "Source Han Sans JP", "Source Han Sans SC", "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei", "Droid Sans Fallback", "Noto Sans", "Arial Unicode MS",
)
# Fonts that map every character to a placeholder picture (matplotlib bundles one):
# never a choice, they draw boxes.
_PLACEHOLDER_FONTS = ("Last Resort",)
# Characters shown as escapes: control, format (zero-width), surrogate, private use,
# unassigned, line and paragraph separators.
_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _block_max(a: np.ndarray, ft: int, fu: int) -> np.ndarray:
    """``(T, U)`` -> ``(ceil(T/ft), ceil(U/fu))``, max over each block (NaN-padded edges)."""
    T, U = a.shape
    Tp, Up = -(-T // ft) * ft, -(-U // fu) * fu
    pad = np.full((Tp, Up), np.nan)
    pad[:T, :U] = a
    return np.nanmax(pad.reshape(Tp // ft, ft, Up // fu, fu), axis=(1, 3))


def _ordinal(k: int) -> str:
    """2 -> "2nd", 3 -> "3rd", 11 -> "11th", 21 -> "21st"."""
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _escape(c: str) -> str:
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def display_name(name: str, limit: int = NAME_CHARS,
                 drawable: frozenset[int] | None = None) -> str:
    """``name`` as shown on the plot: invisible and control characters escaped
    (``\\n``, ``\\x00``, ``\\u200b``), and those not in ``drawable`` (code points,
    when given), cut to ``limit`` characters ending in "…" (never inside an escape);
    ``''`` for an empty name."""
    if name == "":
        return "''"
    pieces = [_escape(c) if unicodedata.category(c) in _ESCAPED
              or (drawable is not None and ord(c) not in drawable) else c for c in name]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    out, n = [], 0
    for p in pieces:
        if n + len(p) > limit - 1:
            break
        out.append(p)
        n += len(p)
    return "".join(out) + "…"


# --------------------------------------------------------------------------- fonts
@functools.cache
def _charmap(fname: str, index: int = 0) -> frozenset[int]:
    """The code points a font file has glyphs for (empty if it cannot be read)."""
    from matplotlib.ft2font import FT2Font

    try:
        try:
            font = FT2Font(fname, face_index=index) if index else FT2Font(fname)
        except TypeError:  # matplotlib < 3.10: no face_index, face 0
            font = FT2Font(fname)
        return frozenset(font.get_charmap())
    except Exception:  # an unreadable or broken font file: it covers nothing
        return frozenset()


def _resolved(family: str | list[str]) -> frozenset[int]:
    """The code points of the font matplotlib draws ``family`` with (empty if none)."""
    from matplotlib.font_manager import FontProperties, findfont

    try:
        path = findfont(FontProperties(family=family), fallback_to_default=False)
    except Exception:  # no such family (matplotlib raises ValueError)
        return frozenset()
    return _charmap(os.fspath(path), getattr(path, "face_index", 0) or 0)


def _default_font() -> tuple[str, frozenset[int]]:
    """The default text font (matplotlib's rcParams): its file and code points."""
    from matplotlib.font_manager import FontProperties, findfont

    path = findfont(FontProperties())
    return os.fspath(path), _charmap(os.fspath(path), getattr(path, "face_index", 0) or 0)


@functools.cache
def _fallback_font(base: str, missing: frozenset[int]) -> tuple[str | None, frozenset[int]]:
    """An installed font family for the code points ``missing`` from the default font
    ``base`` (a file name: part of the cache key, rcParams may change): the first of
    ``PREFERRED_FONTS``, then of the others by name, that has all of them; else the
    one that has the most (None if no font has any). Returns it and the code points
    it draws."""
    from matplotlib.font_manager import fontManager

    order = {name: i for i, name in enumerate(PREFERRED_FONTS)}
    entries = sorted((e for e in fontManager.ttflist
                      if not e.name.startswith(_PLACEHOLDER_FONTS)),
                     key=lambda e: (order.get(e.name, len(order)), e.name, e.fname))
    best, best_cover, seen = None, frozenset(), set()
    for e in entries:
        if e.name in seen:
            continue
        cover = missing & _charmap(e.fname, getattr(e, "index", 0) or 0)
        if len(cover) <= len(best_cover):
            continue
        seen.add(e.name)
        # What matplotlib draws for the family name (a family's other files may differ).
        cover = missing & _resolved(e.name)
        if len(cover) > len(best_cover):
            best, best_cover = e.name, cover
            if cover == missing:
                break
    return best, best_cover


def _fonts_for(texts: Sequence[str]) -> tuple[list[str] | None, frozenset[int]]:
    """The font family list to draw ``texts`` with (None: the default will do) and
    every code point those fonts can draw among the texts' characters."""
    base, base_cover = _default_font()
    wanted = frozenset(ord(c) for t in texts for c in t)
    missing = wanted - base_cover
    if not missing:
        return None, wanted
    from matplotlib import rcParams

    extra, cover = _fallback_font(base, missing)
    drawable = (wanted & base_cover) | cover
    if extra is None:
        return None, drawable
    return [*rcParams["font.family"], extra], drawable


# --------------------------------------------------------------------------- figure
def _u_axis(U1: int, tokens: Sequence[str] | None) -> tuple[list[int], list[str], str]:
    """The u axis: ticks, their names as displayed (before any font fallback), label."""
    if tokens is None:
        return [], [], "labels emitted u"
    k = max(1, math.ceil(U1 / MAX_NAMES))
    ticks = list(range(0, U1, k))
    names = [EMPTY if u == 0 else display_name(str(tokens[u - 1])) for u in ticks]
    note = f" (every {_ordinal(k)} token named)" if k > 1 else ""
    return ticks, names, "labels emitted u" + note


def build_figure(
    *,
    utt_id: str,
    loss: float,
    best_log_prob: float,
    occupancy: np.ndarray,
    best_path: np.ndarray,
    grad_norm: np.ndarray | None,
    tokens: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    path_markers: bool = False,
) -> Figure:
    """The figure ``plot_utterance`` saves: two panels sharing the t axis, log10
    occupancy (``OCCUPANCY_RANGE``) with the Viterbi path over it and log10 gradient
    norm (``GRAD_NORM_RANGE``). Arrays are ``(T, U+1)``; t on the x axis, u on the y
    axis (origin lower); ``tokens`` names the U labels, ``labels`` are their ids
    (shown for a name no installed font can draw; without them its characters are
    escaped). ``path_markers``: a dot at each node of the path (a TDT path, whose
    arcs jump frames: ``best_path`` holds the nodes its arcs leave, then the end
    ``(T, U)``). A path that ends past the last frame (a TDT path's end, at t = T)
    widens the t axis to show it, past the heatmaps' last column, and its end node is
    marked (a square, "end (t, u)" in the legend). ``grad_norm`` None (a TDT lattice
    dump stores none): the first panel alone. Drawing it prints no warning."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    T, U1 = occupancy.shape
    ft, fu = max(1, math.ceil(T / MAX_T)), max(1, math.ceil(U1 / MAX_U))
    log_occ = np.log10(np.maximum(occupancy, 1e-12))
    gnorm = None if grad_norm is None else np.log10(np.maximum(grad_norm, 1e-12))
    if ft > 1 or fu > 1:
        log_occ = _block_max(log_occ, ft, fu)
        gnorm = None if gnorm is None else _block_max(gnorm, ft, fu)

    ticks, names, ylabel = _u_axis(U1, tokens)
    title_id = display_name(str(utt_id), ID_CHARS)
    family, drawable = _fonts_for([*names, title_id])
    if any(ord(c) not in drawable for c in title_id):
        title_id = display_name(str(utt_id), ID_CHARS, drawable)
    undrawable = [i for i, n in enumerate(names) if any(ord(c) not in drawable for c in n)]
    for i in undrawable:
        u = ticks[i]
        names[i] = (f"#{int(labels[u - 1])}" if labels is not None
                    else display_name(str(tokens[u - 1]), drawable=drawable))
    if undrawable and labels is not None:
        ylabel += "\n(#N: token id, no installed font draws its name)"
    font = {"fontfamily": family} if family else {}

    width = min(16.0, 5.5 + log_occ.shape[0] / 12)
    panels = 1 if gnorm is None else 2
    height = min(12.0, 2.0 + panels * (1.2 + log_occ.shape[1] / 10))
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(panels, 1, sharex=True)))
    extent = (-0.5, T - 0.5, -0.5, U1 - 0.5)
    im0 = axes[0].imshow(log_occ.T, origin="lower", aspect="auto", cmap="viridis",
                         vmin=OCCUPANCY_RANGE[0], vmax=OCCUPANCY_RANGE[1], extent=extent,
                         interpolation="nearest")
    single = len(best_path) < 2  # one node (T = 1, U = 0): a line would not show
    axes[0].plot(best_path[:, 0], best_path[:, 1], color="red", lw=1.2,
                 marker="o" if single else ("." if path_markers else None),
                 ms=4 if single or not path_markers else 5,
                 label=f"best path (log P = {best_log_prob:.3f})"
                 + (", arcs jump frames" if path_markers else ""))
    # A TDT path ends at (T, U), after the last frame: the t axis runs on to show it.
    x_max = T - 0.5
    if len(best_path) and best_path[-1, 0] > T - 1:
        end_t, end_u = best_path[-1]
        x_max = max(x_max, float(end_t) + 0.5)
        axes[0].plot([end_t], [end_u], color="red", ls="none", marker="s", ms=5,
                     label=f"end ({int(end_t)}, {int(end_u)}), after the last frame")
    axes[0].legend(loc="upper left", fontsize=8, framealpha=0.8)
    axes[0].set_title("log10 P(the alignment passes through (t, u))", fontsize=10)
    fig.colorbar(im0, ax=axes[0], fraction=0.03, extend="min",
                 label="log10 P")
    if gnorm is not None:
        im1 = axes[1].imshow(gnorm.T, origin="lower", aspect="auto", cmap="magma",
                             vmin=GRAD_NORM_RANGE[0], vmax=GRAD_NORM_RANGE[1], extent=extent,
                             interpolation="nearest")
        axes[1].set_title("log10 ||d loss / d logits[t, u, :]||", fontsize=10)
        fig.colorbar(im1, ax=axes[1], fraction=0.03, extend="min", label="log10 norm")
    axes[-1].set_xlabel("frame t")
    # Integer ticks only, also when there is one frame / one row (T = 1, U = 0).
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    for ax in axes:
        ax.set_xlim(-0.5, x_max)
        ax.set_ylim(-0.5, U1 - 0.5)
        ax.set_ylabel(ylabel, fontsize=10 if "\n" not in ylabel else 8)
        if tokens is None:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        else:
            ax.set_yticks(ticks)
            ax.set_yticklabels(names, fontsize=7 if len(ticks) > 30 else 8, parse_math=False,
                               **font)
    title = f"{title_id}   loss {loss:.4f} nats   T={T} U={U1 - 1}"
    if ft > 1 or fu > 1:
        title += f"\n(downsampled for display: max over {ft} frames x {fu} label positions)"
    fig.suptitle(title, fontsize=11, parse_math=False, **font)
    return fig


def plot_utterance(path, **figure) -> None:
    """Write ``build_figure(**figure)`` as one PNG to ``path`` (a file name or a binary
    file); the keyword arguments are ``build_figure``'s."""
    fig = build_figure(**figure)
    fig.savefig(path, dpi=90, format="png")


def save_png(out_dir: str | os.PathLike, aligned: AlignedUtterance,
             inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``aligned``'s heatmaps (``plot_utterance``) as ``out_dir/<name>.png`` and
    return that path.

    The name is ``output.confined_name`` of the utterance id (percent-encoded,
    never outside ``out_dir``). The PNG is written through ``output.atomic_file``:
    a temporary file renamed onto the name on success, so the PNG is there whole
    or not at all, and a symbolic link planted at the name is replaced, never
    written through. A name that is one of ``inputs`` is refused (OutputError).
    ``aligned`` must have a finite loss and its ``grad_norm`` (but for a TDT lattice
    dump's alignment, ``grad_norm`` None: the occupancy panel alone).
    """
    from .output import atomic_file, confined_name

    if aligned.grad_norm is None and not aligned.without_grad_norms:
        raise ValueError(f"utterance {aligned.utt_id!r}: no gradient norms to plot "
                         "(align_utterance(..., grad_norms=True) of a finite loss)")
    dest = Path(out_dir) / confined_name(aligned.utt_id, ".png")
    al = aligned.alignment
    with atomic_file(dest, inputs=inputs) as png:
        plot_utterance(png, utt_id=aligned.utt_id, loss=al.loss, best_log_prob=al.best_log_prob,
                       occupancy=al.occupancy, best_path=al.path, grad_norm=aligned.grad_norm,
                       tokens=aligned.tokens, labels=aligned.labels,
                       path_markers=hasattr(al, "arcs"))
    return dest
