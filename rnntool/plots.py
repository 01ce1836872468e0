"""Heatmaps of the T x (U+1) lattice: node occupancy with the best path, and gradient norms.

matplotlib with the Agg backend (no display). Long utterances are reduced by
taking the max over blocks of frames / label positions, and the figure says so.
``plot_utterance`` draws arrays into a file; ``save_png`` writes an aligned
utterance (``analysis.align_utterance(..., grad_norms=True)``) into a directory,
atomically, under a name made from its id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .analysis import AlignedUtterance

MAX_T = 1000  # displayed columns at most
MAX_U = 300  # displayed rows at most


def _block_max(a: np.ndarray, ft: int, fu: int) -> np.ndarray:
    """``(T, U)`` -> ``(ceil(T/ft), ceil(U/fu))``, max over each block (NaN-padded edges)."""
    T, U = a.shape
    Tp, Up = -(-T // ft) * ft, -(-U // fu) * fu
    pad = np.full((Tp, Up), np.nan)
    pad[:T, :U] = a
    return np.nanmax(pad.reshape(Tp // ft, ft, Up // fu, fu), axis=(1, 3))


def plot_utterance(
    path: str,
    *,
    utt_id: str,
    loss: float,
    best_log_prob: float,
    occupancy: np.ndarray,
    best_path: np.ndarray,
    grad_norm: np.ndarray,
    tokens: Sequence[str] | None = None,
) -> None:
    """Write one PNG: log10 occupancy with the Viterbi path over it, and the per-node
    gradient norm ``||d loss / d logits[t, u, :]||``. Arrays are ``(T, U+1)``; t on
    the x axis, u on the y axis (origin lower); ``tokens`` names the U labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, U1 = occupancy.shape
    ft, fu = max(1, math.ceil(T / MAX_T)), max(1, math.ceil(U1 / MAX_U))
    log_occ = np.log10(np.maximum(occupancy, 1e-12))
    gnorm = np.log10(np.maximum(grad_norm, 1e-12))
    if ft > 1 or fu > 1:
        log_occ, gnorm = _block_max(log_occ, ft, fu), _block_max(gnorm, ft, fu)
    width = min(16.0, 4.0 + log_occ.shape[0] / 12)
    height = min(12.0, 2.0 + 2 * (1.2 + log_occ.shape[1] / 10))
    fig, axes = plt.subplots(2, 1, figsize=(width, height), sharex=True, constrained_layout=True)
    extent = (-0.5, T - 0.5, -0.5, U1 - 0.5)
    im0 = axes[0].imshow(log_occ.T, origin="lower", aspect="auto", cmap="viridis",
                         vmin=-8, vmax=0, extent=extent, interpolation="nearest")
    axes[0].plot(best_path[:, 0], best_path[:, 1], color="red", lw=1.2,
                 label=f"best path (log P = {best_log_prob:.3f})")
    axes[0].legend(loc="upper left", fontsize=8, framealpha=0.8)
    axes[0].set_title("log10 node occupancy P((t, u) on the alignment)", fontsize=10)
    fig.colorbar(im0, ax=axes[0], fraction=0.03)
    im1 = axes[1].imshow(gnorm.T, origin="lower", aspect="auto", cmap="magma",
                         vmin=max(-8.0, float(np.nanmin(gnorm))), extent=extent,
                         interpolation="nearest")
    axes[1].set_title("log10 ||d loss / d logits[t, u, :]||", fontsize=10)
    fig.colorbar(im1, ax=axes[1], fraction=0.03)
    axes[1].set_xlabel("frame t")
    for ax in axes:
        ax.set_ylabel("labels emitted u")
        if tokens is not None and U1 <= 60:
            ax.set_yticks(range(U1))
            ax.set_yticklabels(["∅", *tokens], fontsize=7 if U1 > 30 else 8)
    title = f"{utt_id}   loss {loss:.4f} nats   T={T} U={U1 - 1}"
    if ft > 1 or fu > 1:
        title += f"\n(downsampled for display: max over {ft} frames x {fu} label positions)"
    fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)


def save_png(out_dir: str | os.PathLike, aligned: AlignedUtterance,
             inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Write ``aligned``'s heatmaps (``plot_utterance``) as ``out_dir/<name>.png`` and
    return that path.

    The name is ``output.confined_name`` of the utterance id (percent-encoded,
    never outside ``out_dir``). The PNG is written through ``output.atomic_file``:
    a temporary file renamed onto the name on success, so the PNG is there whole
    or not at all, and a symbolic link planted at the name is replaced, never
    written through. A name that is one of ``inputs`` is refused (OutputError).
    ``aligned`` must have a finite loss and its ``grad_norm``.
    """
    from .output import atomic_file, confined_name

    if aligned.grad_norm is None:
        raise ValueError(f"utterance {aligned.utt_id!r}: no gradient norms to plot "
                         "(align_utterance(..., grad_norms=True) of a finite loss)")
    dest = Path(out_dir) / confined_name(aligned.utt_id, ".png")
    al = aligned.alignment
    with atomic_file(dest, inputs=inputs) as png:
        plot_utterance(png, utt_id=aligned.utt_id, loss=al.loss, best_log_prob=al.best_log_prob,
                       occupancy=al.occupancy, best_path=al.path, grad_norm=aligned.grad_norm,
                       tokens=aligned.tokens)
    return dest
