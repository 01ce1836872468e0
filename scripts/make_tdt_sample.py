"""Train a tiny Token-and-Duration Transducer (TDT) on the synthetic task of
``make_sample_data.py`` and dump its held-out joint outputs as a TDT dump.

Makes ``sample_data/sample-tdt.h5`` (keyed layout, ``model_kind="tdt"``,
``durations=[0, 1, 2, 3, 4]``, a vocab, and the trainer's own loss per utterance),
which the README's TDT example scores and aligns. The task's letters last 2-4
frames each, so a trained TDT model learns to jump over a letter's frames with
durations 2-4 instead of emitting a blank per frame (its encoder is bidirectional,
so a frame sees how long its letter lasts). 5 to 20 minutes on two shared CPU
cores, depending on their load; fixed seeds.

    python scripts/make_tdt_sample.py [--out sample_data/sample-tdt.h5] [--steps 1500]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sample_data import FEAT, LETTERS, VOCAB, TinyTransducer, make_batch, make_example  # noqa: E402

import rnntool  # noqa: E402
from rnntool import DumpWriter  # noqa: E402

DURATIONS = [0, 1, 2, 3, 4]


class TinyTDT(TinyTransducer):
    """``make_sample_data``'s transducer with a bidirectional encoder: a frame then sees
    how long its letter lasts, so the model can predict the duration to jump."""

    def __init__(self, V: int, H: int = 64):
        super().__init__(V, H)
        self.encoder = nn.GRU(FEAT, H // 2, batch_first=True, bidirectional=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sample_data/sample-tdt.h5")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--utts", type=int, default=12, help="held-out utterances to dump")
    args = ap.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(len(VOCAB), FEAT, generator=g)
    # The joint's last layer gives V token logits, then one logit per duration.
    model = TinyTDT(len(VOCAB) + len(DURATIONS))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.time()
    for step in range(1, args.steps + 1):
        feats, labels, T, U = make_batch(g, protos, 32)
        loss = rnntool.tdt_loss(model(feats, labels), labels, T, U, durations=DURATIONS,
                                blank=0, reduction="mean_tokens")
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: loss/token {loss.item():.4f} ({time.time() - start:.0f} s)")

    model.eval()
    held = torch.Generator().manual_seed(99)
    with DumpWriter(args.out, blank=0, vocab=VOCAB, model_kind="tdt",
                    durations=DURATIONS) as w:
        for n in range(args.utts):
            x, y = make_example(held, protos)
            with torch.no_grad():
                logits = model(x[None], y[None])
            T, U = torch.tensor([x.shape[0]]), torch.tensor([y.shape[0]])
            trainer_loss = rnntool.tdt_loss(logits, y[None], T, U, durations=DURATIONS,
                                            blank=0, reduction="sum")
            text = "".join(LETTERS[i - 1] for i in y.tolist())
            w.add(f"utt{n:03d}", logits[0], y, text=text, loss=float(trainer_loss))
    print(f"wrote {args.out}: {args.utts} utterances, vocab {len(VOCAB)}, durations "
          f"{DURATIONS}")


if __name__ == "__main__":
    main()
