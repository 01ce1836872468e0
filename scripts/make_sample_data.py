"""Train a tiny transducer on a synthetic task and dump its held-out logits.

Makes ``sample_data/sample.h5`` (keyed layout, with a vocab, the trainer's own
loss per utterance, and trainer gradients for two utterances), which the
README's first command scores, and ``sample_data/sample-lattice.h5``, the same
utterances as a lattice dump (``DumpWriter(kind="lattice")``; the same file as
``rnntool compact sample_data/sample.h5``). About a minute on two CPU cores;
fixed seeds.

The task: each utterance is a random word over a 10-letter alphabet; its
"audio" is, per letter, 2-4 frames of that letter's prototype feature vector
plus noise, with occasional silence frames between letters. A trained model's
alignments are sharp and monotonic, as a real ASR model's are.

    python scripts/make_sample_data.py [--out sample_data/sample.h5] [--steps 3000]
                                       [--lattice-out sample_data/sample-lattice.h5]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import rnntool
from rnntool import DumpWriter

LETTERS = "abcdefghij"
VOCAB = ["<blank>", *LETTERS]  # blank = 0
FEAT = 16


def make_example(g: torch.Generator, protos: torch.Tensor, max_len: int = 10):
    """(features (T, FEAT), labels (U,))."""
    U = int(torch.randint(3, max_len + 1, (1,), generator=g))
    labels = torch.randint(1, len(VOCAB), (U,), generator=g)
    frames = []
    for y in labels.tolist():
        for _ in range(int(torch.randint(0, 3, (1,), generator=g)) // 2):  # silence, sometimes
            frames.append(torch.zeros(FEAT))
        for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
            frames.append(protos[y])
    frames.append(torch.zeros(FEAT))
    x = torch.stack(frames)
    return x + 0.35 * torch.randn(x.shape, generator=g), labels


def make_batch(g, protos, B):
    ex = [make_example(g, protos) for _ in range(B)]
    T = torch.tensor([x.shape[0] for x, _ in ex])
    U = torch.tensor([y.shape[0] for _, y in ex])
    feats = torch.zeros(B, int(T.max()), FEAT)
    labels = torch.zeros(B, int(U.max()), dtype=torch.long)
    for b, (x, y) in enumerate(ex):
        feats[b, : x.shape[0]] = x
        labels[b, : y.shape[0]] = y
    return feats, labels, T, U


class TinyTransducer(nn.Module):
    def __init__(self, V: int, H: int = 64):
        super().__init__()
        self.encoder = nn.GRU(FEAT, H, batch_first=True)
        self.embed = nn.Embedding(V, 32)
        self.predictor = nn.GRU(32, H, batch_first=True)
        self.enc_proj = nn.Linear(H, H)
        self.pred_proj = nn.Linear(H, H)
        self.out = nn.Linear(H, V)

    def forward(self, feats, labels):
        """feats (B, T, FEAT), labels (B, U) -> logits (B, T, U+1, V)."""
        enc, _ = self.encoder(feats)
        # The prediction network sees blank (0) as its start symbol, then the labels.
        start = torch.zeros(labels.shape[0], 1, dtype=labels.dtype)
        pred, _ = self.predictor(self.embed(torch.cat([start, labels], 1)))
        joint = torch.tanh(self.enc_proj(enc)[:, :, None] + self.pred_proj(pred)[:, None])
        return self.out(joint)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="sample_data/sample.h5")
    ap.add_argument("--lattice-out", default="sample_data/sample-lattice.h5")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--utts", type=int, default=24, help="held-out utterances to dump")
    args = ap.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    protos = torch.randn(len(VOCAB), FEAT, generator=g)
    model = TinyTransducer(len(VOCAB))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.time()
    for step in range(1, args.steps + 1):
        feats, labels, T, U = make_batch(g, protos, 32)
        loss = rnntool.rnnt_loss(model(feats, labels), labels, T, U, blank=0,
                                 reduction="mean_tokens")
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if step % 250 == 0:
            print(f"step {step}: loss/token {loss.item():.4f} ({time.time() - start:.0f} s)")

    model.eval()
    held = torch.Generator().manual_seed(99)
    with (DumpWriter(args.out, blank=0, vocab=VOCAB) as w,
          DumpWriter(args.lattice_out, blank=0, vocab=VOCAB, kind="lattice") as lw):
        for n in range(args.utts):
            x, y = make_example(held, protos)
            logits = model(x[None], y[None]).detach()
            T, U = torch.tensor([x.shape[0]]), torch.tensor([y.shape[0]])
            leaf = logits.clone().requires_grad_(True)
            trainer_loss = rnntool.rnnt_loss(leaf, y[None], T, U, blank=0, reduction="sum")
            grads = None
            if n < 2:  # what a trainer would dump for `rnntool grad-check`
                trainer_loss.backward()
                grads = leaf.grad[0]
            text = "".join(LETTERS[i - 1] for i in y.tolist())
            w.add(f"utt{n:03d}", logits[0], y, grads=grads, text=text,
                  loss=float(trainer_loss.detach()))
            lw.add(f"utt{n:03d}", logits[0], y, text=text, loss=float(trainer_loss.detach()))
    print(f"wrote {args.out} and {args.lattice_out}: {args.utts} utterances, vocab "
          f"{len(VOCAB)}")


if __name__ == "__main__":
    main()
