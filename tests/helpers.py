"""Shared test helpers: random padded batches, the reference's reductions, running the CLI."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
from typer.testing import CliRunner

from rnntool.cli import app
from rnntool.dump import DumpWriter
from rnntool.loss import reduction_weights
from rnntool.reference import reference_gradients


def random_batch(
    B: int, T: int, U: int, V: int, *, blank: int = 0, seed: int = 0,
    scale: float = 1.0, mixed: bool = True, dtype=torch.float32, extra: int = 0,
):
    """Padded ``(B, T, U+1, V + extra)`` logits, ``(B, U)`` targets and lengths.

    With ``mixed`` the lengths vary in [1, T] x [0, U] (the first utterance is
    full-length); labels (in [0, V)) avoid ``blank`` and padding labels are -1.
    ``extra`` columns follow the V token logits (TDT's duration logits).
    """
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, U + 1, V + extra, generator=g, dtype=torch.float64)
              * scale).to(dtype)
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


def write_lattice_raw(path, utts: dict, **root_attrs) -> None:
    """A lattice dump written with h5py directly, nothing validated: ``utts`` maps an id
    to a dict of its datasets (``blank_lp``, ``emit_lp``, ``log_p2_others``,
    ``labels``; arrays, or ``h5py.ExternalLink``s and the like, stored as given) and
    attributes (any other value that is a ``str`` or a number: ``text``, ``loss``).
    ``root_attrs`` override those of a valid lattice dump (format version 2,
    ``dump_kind="lattice"``, blank 0, vocab_size 5, input_kind "logits"); a value
    of None leaves that attribute out."""
    import h5py

    attrs = {"format": "rnntool.dump", "format_version": 2, "dump_kind": "lattice",
             "blank": 0, "vocab_size": 5, "input_kind": "logits", **root_attrs}
    with h5py.File(path, "w") as f:
        g = f.create_group("utts")
        for utt_id, items in utts.items():
            u = g.create_group(utt_id)
            for k, v in items.items():
                if isinstance(v, str | int | float):
                    u.attrs[k] = v
                else:
                    u[k] = v
        for k, v in attrs.items():
            if v is not None:
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


def one_line_error(result, *needles, code=2) -> str:
    """``result`` (a CliRunner result or a finished subprocess) ended with exit ``code``
    and one ``rnntool: error:`` line on stderr holding every needle, no traceback;
    returns that line."""
    rc = result.returncode if isinstance(result, subprocess.CompletedProcess) \
        else result.exit_code
    assert rc == code, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("rnntool: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for n in needles:
        assert str(n) in err[0], err[0]
    return err[0]


# --------------------------------------------------------------------------- the loss engine
# The backends the engine suite runs on (the `backend` fixture of conftest.py). "cuda"
# runs the CUDA kernels in Numba's simulator on CPU tensors here.
BACKENDS = ("cpu", "cuda")

# Tiny CUDA launch shapes, so that every multi-chunk path runs even on tiny inputs:
# several v per thread and a tree reduction (threads_v=4), several rows per block,
# grid-striding over rows (max_blocks=3), several u per thread (threads_diag=2).
SMALL_LAUNCHES = {"threads_v": 4, "rows_per_block": 2, "threads_diag": 2, "max_blocks": 3}

# The fixed public case: B=1, T=2, U=2, V=5, labels [1, 2], blank 0.
PUBLIC_LOGITS = [
    [[0.1, 0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.6, 0.1, 0.1], [0.1, 0.1, 0.2, 0.8, 0.1]],
    [[0.1, 0.6, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.1, 0.1], [0.7, 0.1, 0.2, 0.1, 0.1]],
]
PUBLIC_LOSS = 4.495666

# (loss atol, gradient atol) by dtype: the lattice is float32 except for float64,
# and half inputs are rounded before the engine sees them (the reference
# gets the same rounded values), so only the gradient's rounding differs.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-4, 2e-6),
    torch.float16: (2e-4, 2e-3),
    torch.bfloat16: (2e-4, 1e-2),
}


def run_engine(logits, labels, t_len, u_len, *, grad_output=None, backend="cpu",
               reduction="none", **kw):
    """``rnnt_loss``'s value and the gradient of ``grad_output`` (default ones) w.r.t. a
    copy of ``logits``."""
    from rnntool import rnnt_loss

    kw.setdefault("blank", 0)  # random_batch's (rnnt_loss's own default is torchaudio's -1)
    x = logits.detach().clone().requires_grad_(True)
    loss = rnnt_loss(x, labels, t_len, u_len, backend=backend, reduction=reduction, **kw)
    if grad_output is None:
        grad_output = torch.ones_like(loss)
    loss.backward(grad_output.to(loss.dtype))
    return loss.detach(), x.grad


def assert_matches_reference(logits, labels, t_len, u_len, *, reduction="none", seed=0,
                             backend="cpu", grad_rtol=None, **kw):
    """``rnnt_loss`` on ``backend``: value and gradient (for a random ``grad_output``)
    within ``TOL`` of the float64 reference's, the gradient in the input's dtype."""
    dtype = logits.dtype
    B = logits.shape[0]
    g = torch.Generator().manual_seed(seed)
    go = torch.rand(B if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5
    loss, grad = run_engine(
        logits, labels, t_len, u_len, grad_output=go, reduction=reduction, backend=backend, **kw
    )
    ref_loss, ref_grad = reference_loss_and_grad(
        logits.double(), labels, t_len, u_len, reduction=reduction, grad_output=go, **kw
    )
    loss_atol, grad_atol = TOL[dtype]
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(loss.double(), ref_loss, atol=loss_atol, rtol=1e-5)
    if grad_rtol is None:
        grad_rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(grad.double(), ref_grad, atol=grad_atol, rtol=grad_rtol)


def examples(backend: str, cuda: int = 12) -> int:
    """hypothesis's ``max_examples`` for a property on ``backend``: the profile's on the
    CPU, at most ``cuda`` on the CUDA kernels in Numba's simulator (seconds each)."""
    from hypothesis import settings

    n = settings().max_examples
    return n if backend == "cpu" else min(n, cuda)


# --------------------------------------------------------------------------- dumps
def write_padded(path, logits, labels, t_len, u_len, utt_ids=None, **attrs):
    """The padded layout a training loop dumps directly (root datasets)."""
    with h5py.File(path, "w") as f:
        f["logits"] = logits
        f["labels"] = labels
        f["logit_lengths"] = t_len
        f["label_lengths"] = u_len
        if utt_ids is not None:
            f["utt_ids"] = np.array(utt_ids, dtype=h5py.string_dtype())
        for k, v in attrs.items():
            f.attrs[k] = v


BAD_DUMPS = [  # (how the dump is broken, what the one-line error says)
    ("label", "utterance u1: labels[0] = 99 is outside [0, 5)"),
    ("blank_label", "utterance u1: labels[0] = 0 equals blank"),
    ("missing", "utterance u1: missing dataset labels"),
    ("dims", "utterance u1: logits must be (T, U+1, V)"),
    ("T0", "utterance u1: T = 0"),
]


def bad_dump(path, how):
    """A two-utterance dump whose second utterance is broken as ``how`` says."""
    with DumpWriter(path) as w:
        w.add("u0", np.zeros((3, 3, 5), np.float32), [1, 2])
        w.add("u1", np.zeros((3, 3, 5), np.float32), [1, 2])
    with h5py.File(path, "r+") as f:
        if how == "label":
            f["utts/u1/labels"][0] = 99
        elif how == "blank_label":
            f["utts/u1/labels"][0] = 0
        elif how == "missing":
            del f["utts/u1/labels"]
        elif how == "dims":
            del f["utts/u1/logits"]
            f["utts/u1/logits"] = np.zeros((3, 4), np.float32)
        elif how == "T0":
            del f["utts/u1/logits"]
            f["utts/u1/logits"] = np.zeros((0, 3, 5), np.float32)
            del f["utts/u1/labels"]
            f["utts/u1/labels"] = np.array([1, 2])
    return path


def read_lattice_dump(path) -> tuple[dict, dict]:
    """Everything a lattice dump holds, read with h5py directly for exact comparisons:
    ``(root, utts)``: ``root`` the root attributes (and ``vocab``: the token names or
    None), ``utts`` maps an id to its datasets (``blank_lp``, ``emit_lp``,
    ``log_p2_others``, ``labels``: numpy arrays as stored) and attributes (``attrs``)."""
    def plain(v):
        v = v.decode() if isinstance(v, bytes) else v
        return v.item() if isinstance(v, np.generic) else v

    with h5py.File(path, "r") as f:
        root = {k: plain(v) for k, v in f.attrs.items()}
        root["vocab"] = ([plain(t) for t in f["vocab"][()]] if "vocab" in f else None)
        utts = {}
        for utt_id, g in f["utts"].items():
            utts[utt_id] = {name: g[name][()] for name in g}
            utts[utt_id]["attrs"] = {k: plain(v) for k, v in g.attrs.items()}
    return root, utts
