"""Shared test helpers: random padded batches, the reference's reductions, running the CLI."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from rnntool.cli import app
from rnntool.loss import reduction_weights
from rnntool.reference import reference_gradients


def random_batch(
    B: int, T: int, U: int, V: int, *, blank: int = 0, seed: int = 0,
    scale: float = 1.0, mixed: bool = True, dtype=torch.float32,
):
    """Padded ``(B, T, U+1, V)`` logits, ``(B, U)`` targets and lengths.

    With ``mixed`` the lengths vary in [1, T] x [0, U] (the first utterance is
    full-length); labels avoid ``blank`` and padding labels are -1.
    """
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, U + 1, V, generator=g, dtype=torch.float64) * scale).to(dtype)
    blank_idx = blank % V
    # Labels in [0, V) \ {blank}.
    labels = torch.randint(0, V - 1, (B, U), generator=g)
    labels = labels + (labels >= blank_idx).long()
    if mixed:
        t_len = torch.randint(1, T + 1, (B,), generator=g)
        u_len = torch.randint(0, U + 1, (B,), generator=g)
        t_len[0], u_len[0] = T, U
    else:
        t_len = torch.full((B,), T)
        u_len = torch.full((B,), U)
    for b in range(B):
        labels[b, int(u_len[b]):] = -1
    return logits, labels, t_len, u_len


def reference_loss_and_grad(
    logits, labels, t_len, u_len, *, blank=0, reduction="none", grad_output=None,
    fused_log_softmax=True, fastemit_lambda=0.0, clamp=None,
):
    """The float64 reference's reduced loss and its gradient for ``grad_output``.

    Clamping, as in rnnt_loss, clips each utterance's own gradient before the
    reduction's weights and ``grad_output`` scale it.
    """
    losses, grads = reference_gradients(
        logits, labels, t_len, u_len, blank=blank,
        fused_log_softmax=fused_log_softmax, fastemit_lambda=fastemit_lambda,
    )
    if clamp is not None and clamp > 0:
        grads = grads.clamp(-clamp, clamp)
    w = reduction_weights(reduction, t_len, u_len)
    B = logits.shape[0]
    if grad_output is None:
        grad_output = torch.ones(B if reduction == "none" else (), dtype=torch.float64)
    go = grad_output.to(torch.float64).expand(B)
    grad = grads * (go * w).view(B, 1, 1, 1)
    value = losses if reduction == "none" else (losses * w).sum()
    return value, grad


def write_keyed_raw(path, utts: dict, **root_attrs) -> None:
    """A keyed dump written with h5py directly, nothing validated: ``utts`` maps an id
    to ``(logits, labels)``; ``root_attrs`` become root attributes."""
    import h5py

    with h5py.File(path, "w") as f:
        g = f.create_group("utts")
        for utt_id, (logits, labels) in utts.items():
            u = g.create_group(utt_id)
            u["logits"] = logits
            u["labels"] = labels
        for k, v in root_attrs.items():
            f.attrs[k] = v


def write_padded_raw(path, logits, labels, logit_lengths, label_lengths, **root_attrs) -> None:
    """A padded-layout dump (root datasets) written with h5py directly, nothing validated."""
    import h5py

    with h5py.File(path, "w") as f:
        f["logits"] = logits
        f["labels"] = labels
        f["logit_lengths"] = logit_lengths
        f["label_lengths"] = label_lengths
        for k, v in root_attrs.items():
            f.attrs[k] = v


# --------------------------------------------------------------------------- the command line
ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data" / "sample.h5"
_runner = CliRunner()


def invoke(*args, input=None):
    """Run ``rnntool ARGS`` in-process (CliRunner); arguments may be paths."""
    return _runner.invoke(app, [str(a) for a in args], input=input)


def run_cli(*args, **kw):
    """Run ``python -m rnntool ARGS`` as a real process from the repository root."""
    return subprocess.run([sys.executable, "-m", "rnntool", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, **kw)


def rows_of(text, fmt="tsv"):
    """The rows of TSV (or CSV) output, as dicts."""
    return list(csv.DictReader(io.StringIO(text), delimiter="\t" if fmt == "tsv" else ","))


def one_line_error(result, *needles):
    """``result`` failed with exit code 2 and one ``rnntool: error:`` line holding ``needles``."""
    assert result.exit_code == 2, result.output
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnntool: error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err[0], err[0]
