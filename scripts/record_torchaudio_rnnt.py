"""Record torchaudio's RNN-T loss and gradients for fixed inputs: tests/data/torchaudio_rnnt.npz.

CI has no torchaudio, so tests/test_loss.py compares ``rnntool.rnnt_loss`` and
``rnntool.RNNTLoss`` against the values this script records with torchaudio
itself (run it where torchaudio is installed, e.g. the benchmark venv):

    .bench/bin/python scripts/record_torchaudio_rnnt.py [--check]

Every case calls torchaudio the way a user would (positional ``blank``, the
defaults, ``RNNTLoss()``, clamps, reductions, log-prob input, float32 and
float16; torchaudio refuses float64 and bfloat16), then backpropagates a fixed
``grad_output``. The file holds, for case ``k``: ``k/logits``, ``k/targets``,
``k/logit_lengths``, ``k/target_lengths``, ``k/grad_output``, ``k/loss``,
``k/grad``, and ``k/call``: a JSON object ``{"style", "args", "kwargs"}`` saying
how torchaudio was called (``style``: ``"function"`` or ``"module"``, the
constructor's arguments for a module). ``--check`` also runs rnntool on each
case and prints the largest differences.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torchaudio
import torchaudio.functional as F
import torchaudio.transforms as TT

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "torchaudio_rnnt.npz"


def batch(seed, B=3, T=5, U=3, V=6, *, blank=-1, scale=1.0, full=False):
    """torchaudio's input contract: int32 targets and lengths, zero padded, the
    longest utterance filling the padded T and U+1 (torchaudio checks both)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, U + 1, V, generator=g) * scale
    b = blank % V
    labels = torch.randint(0, V - 1, (B, U), generator=g)
    labels = (labels + (labels >= b).long()).int()
    if full:
        t_len, u_len = torch.full((B,), T), torch.full((B,), U)
    else:
        t_len = torch.randint(1, T + 1, (B,), generator=g)
        u_len = torch.randint(0, U + 1, (B,), generator=g)
        t_len[0], u_len[0] = T, U
    for i in range(B):
        labels[i, int(u_len[i]):] = 0
    return logits, labels, t_len.int(), u_len.int()


# (name, batch kwargs, input: "logits"|"log_probs", dtype, call style, args, kwargs)
CASES = [
    ("positional_blank0", dict(seed=1, blank=0), "logits", "float32", "function", [0], {}),
    ("default_blank", dict(seed=2), "logits", "float32", "function", [], {}),
    ("positional_all", dict(seed=3), "logits", "float32", "function", [-1, -1, "sum", True], {}),
    ("blank_middle_none", dict(seed=4, blank=2), "logits", "float32", "function",
     [2, -1, "none"], {}),
    ("keyword_blank_last_sum", dict(seed=5, blank=5), "logits", "float32", "function", [],
     {"blank": 5, "reduction": "sum"}),
    ("clamp_005_mean", dict(seed=6, blank=0, scale=3.0), "logits", "float32", "function",
     [0, 0.05], {}),
    ("clamp_02_sum", dict(seed=7, scale=3.0), "logits", "float32", "function", [-1, 0.2, "sum"],
     {}),
    ("clamp_0_none", dict(seed=8, blank=0, scale=3.0), "logits", "float32", "function",
     [0, 0.0, "none"], {}),
    ("clamp_01_none", dict(seed=9, blank=0, scale=3.0), "logits", "float32", "function",
     [0, 0.1, "none"], {}),
    ("log_probs_sum", dict(seed=10, blank=0), "log_probs", "float32", "function",
     [0, -1, "sum", False], {}),
    ("log_probs_none_default_blank", dict(seed=11), "log_probs", "float32", "function", [],
     {"reduction": "none", "fused_log_softmax": False}),
    ("float16_default", dict(seed=12), "logits", "float16", "function", [], {}),
    ("float16_none", dict(seed=13, blank=0), "logits", "float16", "function", [0, -1, "none"],
     {}),
    ("float16_clamp_sum", dict(seed=14, scale=3.0), "logits", "float16", "function",
     [-1, 0.1, "sum"], {}),
    ("module_defaults", dict(seed=15), "logits", "float32", "module", [], {}),
    ("module_positional", dict(seed=16, blank=0, scale=3.0), "logits", "float32", "module",
     [0, 0.1, "sum", True], {}),
    ("module_log_probs_none", dict(seed=17), "log_probs", "float32", "module", [],
     {"reduction": "none", "fused_log_softmax": False}),
    ("longer_full", dict(seed=18, B=2, T=12, U=6, V=9, full=True), "logits", "float32",
     "function", [], {"reduction": "none"}),
]


def record(check: bool) -> None:
    arrays = {}
    for name, bkw, kind, dtype, style, args, kwargs in CASES:
        logits, labels, t_len, u_len = batch(**bkw)
        if kind == "log_probs":
            logits = torch.log_softmax(logits, -1)
        x = logits.to(getattr(torch, dtype)).requires_grad_(True)
        if style == "function":
            loss = F.rnnt_loss(x, labels, t_len, u_len, *args, **kwargs)
        else:
            loss = TT.RNNTLoss(*args, **kwargs)(x, labels, t_len, u_len)
        g = torch.Generator().manual_seed(1000 + bkw["seed"])
        go = (torch.rand(loss.shape, generator=g) + 0.5).to(loss.dtype)
        loss.backward(go)
        for key, value in {
            "logits": x.detach(), "targets": labels, "logit_lengths": t_len,
            "target_lengths": u_len, "grad_output": go, "loss": loss.detach(), "grad": x.grad,
        }.items():
            arrays[f"{name}/{key}"] = value.numpy()
        arrays[f"{name}/call"] = np.array(json.dumps(
            {"style": style, "args": args, "kwargs": kwargs}))
        if check:
            import rnntool

            xr = x.detach().clone().requires_grad_(True)
            if style == "function":
                mine = rnntool.rnnt_loss(xr, labels, t_len, u_len, *args, **kwargs)
            else:
                mine = rnntool.RNNTLoss(*args, **kwargs)(xr, labels, t_len, u_len)
            mine.backward(go.to(mine.dtype))
            dl = float((mine.detach().double() - loss.detach().double()).abs().max())
            dg = float((xr.grad.double() - x.grad.double()).abs().max())
            print(f"{name:32s} loss {loss.detach().double().numpy().round(4)} "
                  f"|d loss| {dl:.2e} |d grad| {dg:.2e}")
    arrays["torchaudio_version"] = np.array(torchaudio.__version__)
    arrays["torch_version"] = np.array(torch.__version__)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(CASES)} cases, "
          f"torchaudio {torchaudio.__version__})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare rnntool with each case")
    record(ap.parse_args().check)
