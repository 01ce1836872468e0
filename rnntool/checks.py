"""The rules labels, blank and lengths must follow, stated once.

Every entry point applies them: the reader to what a dump holds, ``DumpWriter``
to what it is given, ``rnnt_loss`` to its arguments. Each words the message in
its own terms (a file and utterance, an argument name) around what these
functions find (``show`` escapes a value from a file for such a message).
Torch-free: numpy arrays and Python ints.

The contract, for an utterance ``b`` of a batch padded to ``(T, U+1, V)`` with
``S`` label slots: ``1 <= T_b <= T``, ``0 <= U_b``, ``U_b + 1 <= U+1``,
``U_b <= S``; ``-V <= blank < V`` (negative counts from the end); every label
within the lengths in ``[0, V)`` and not blank.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


# --------------------------------------------------------------------------- messages
def show(text) -> str:
    """``text`` for a one-line message: printable as it is, else backslash-escaped
    (a newline or terminal escape in an id or path cannot break or forge a line)."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


# --------------------------------------------------------------------------- blank


def normalise_blank(blank: int, V: int) -> int | None:
    """``blank`` as an index in ``[0, V)`` (``-1`` is ``V - 1``), or None when it is
    outside ``[-V, V)`` (always, for ``V = 0``)."""
    return blank % V if -V <= blank < V else None


def blank_problem(blank: int, V: int) -> str | None:
    """``"blank=7 is outside [-V, V) for V=6"``, or None when ``blank`` is in range."""
    if normalise_blank(blank, V) is None:
        return f"blank={blank} is outside [-V, V) for V={V}"
    return None


def check_blank(blank: int, V: int) -> int:
    """``blank`` in ``[0, V)``; ``ValueError`` (``blank_problem``'s text) when it is
    outside ``[-V, V)``."""
    index = normalise_blank(blank, V)
    if index is None:
        raise ValueError(blank_problem(blank, V))
    return index


# --------------------------------------------------------------------------- labels
class BadLabel(NamedTuple):
    """The first label that breaks the rules (see ``bad_label``)."""

    index: tuple[int, ...]  # its position in the labels array
    value: int  # as stored, exactly (uint64 included)
    V: int
    equals_blank: bool  # else outside [0, V)

    def why(self, show_v: bool = False) -> str:
        """``"equals blank"`` or ``"is outside [0, V)"`` (with ``show_v``: ``"... for V=6"``)."""
        if self.equals_blank:
            return "equals blank"
        return f"is outside [0, {self.V})" + (f" for V={self.V}" if show_v else "")

    def message(self, name: str = "labels", show_v: bool = False) -> str:
        """``"labels[3] = 41 is outside [0, 29)"``, ``"targets[1, 2] = 0 equals blank"``."""
        where = ", ".join(str(i) for i in self.index)
        return f"{name}[{where}] = {self.value} {self.why(show_v)}"


def bad_label(labels: np.ndarray, V: int, blank: int,
              within: np.ndarray | None = None) -> BadLabel | None:
    """The first label (in C order) outside ``[0, V)`` or equal to ``blank`` (an index
    in ``[0, V)``: see ``normalise_blank``), or None.

    Compared in the stored dtype, so that no value wraps before it is checked
    (uint64, int8). ``within`` (a boolean array of ``labels``' shape) limits the
    check to the labels inside the lengths.
    """
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= V) | (labels == blank)
    if within is not None:
        bad &= within
    if not bad.any():
        return None
    index = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
    value = int(labels[index])
    return BadLabel(index, value, V, value == blank)


# --------------------------------------------------------------------------- lengths
# The rules lengths may break, in the order rnnt_loss reports them (for the whole
# batch, rule by rule). Compared exactly: U_b >= U+1 rather than U_b + 1 > U+1, which
# would wrap for the largest int64 or uint64.
LENGTH_RULES = ("T_negative", "U_negative", "T_zero", "T_over", "U_over", "U_over_labels")


def length_faults(logit_lengths, label_lengths, T: int, U1: int, S: int) -> dict[str, np.ndarray]:
    """For each of ``LENGTH_RULES``, which utterances break it: boolean arrays of the
    lengths' shape (0-d for Python ints).

    ``T``, ``U1`` (``U+1``), ``S``: the padded logits' T and U+1 dims and the labels'
    width. ``T_negative``: ``T_b < 0``; ``U_negative``: ``U_b < 0``; ``T_zero``:
    ``T_b = 0``; ``T_over``: ``T_b > T``; ``U_over``: ``U_b + 1 > U+1``;
    ``U_over_labels``: ``U_b > S``.
    """
    t = np.asarray(logit_lengths)
    u = np.asarray(label_lengths)
    return {
        "T_negative": t < 0,
        "U_negative": u < 0,
        "T_zero": t == 0,
        "T_over": t > T,
        "U_over": u >= U1,
        "U_over_labels": u > S,
    }


def first_length_fault(logit_lengths, label_lengths, T: int, U1: int,
                       S: int) -> tuple[str, int] | None:
    """``(rule, b)``: the first of ``LENGTH_RULES`` some utterance breaks and the first
    utterance that breaks it (``(B,)`` lengths), or None when all fit."""
    for rule, broken in length_faults(logit_lengths, label_lengths, T, U1, S).items():
        if broken.any():
            return rule, int(np.argmax(broken))
    return None


def lengths_fit(T_b: int, U_b: int, T: int, U1: int, S: int) -> bool:
    """Whether one utterance's lengths follow every rule: ``1 <= T_b <= T``,
    ``0 <= U_b``, ``U_b + 1 <= U1``, ``U_b <= S``."""
    return not any(bool(broken) for broken in length_faults(T_b, U_b, T, U1, S).values())


__all__ = ["BadLabel", "LENGTH_RULES", "bad_label", "blank_problem", "check_blank",
           "first_length_fault", "length_faults", "lengths_fit", "normalise_blank", "show"]
