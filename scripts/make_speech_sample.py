"""Train a small speech transducer on synthesised speech and dump its held-out logits.

Makes ``sample_data/speech/`` (the README's sample; ``rnntool``'s tests read it):

- ``speech.h5``: the joint-network logits ``(T, U+1, V)`` of the shortest held-out
  utterances (the first ones of at most ``--dump-max-words`` words while their
  logits total at most ``--dump-mb`` MB; float16, keyed layout, gzip, blank 0, the
  SentencePiece vocabulary with its ``▁`` word marker kept, each utterance's
  ``text``, and ``stored_loss``, computed at dump time by torchaudio's
  ``rnnt_loss`` on the stored float16 values widened to float32; by rnntool's
  float64 reference where torchaudio is missing). Root attribute ``frame_shift``
  = 0.04: seconds per logit frame.
- ``speech-lattice.h5``: the first ``--lattice-utts`` held-out utterances (those
  of ``speech.h5`` among them) as a lattice dump of the same float16 logits, with
  the same ``text``, ``stored_loss`` and ``frame_shift``.
- ``speech.ctm``: the true time of every word of the lattice dump's utterances, in
  seconds (NIST CTM: ``utt_id 1 start duration word``).
- ``bpe.model``, ``bpe.vocab``: the SentencePiece BPE model the labels use.
- ``info.json``: seeds, versions, sizes, the training curve, the held-out greedy
  WER and the word-start errors of ``rnntool align`` on the lattice dump.

Speech: each sentence (3-12 words) has a voice (an espeak-ng English voice and a
variant), a speed and a pitch. Each word is synthesised alone by espeak-ng,
resampled from 22.05 to 16 kHz, trimmed of leading and trailing silence (first and
last sample above -50 dB of the word's peak) and the words joined with random pauses
(30-250 ms, one in ten 400-900 ms), so every word's start and end is known to the
sample. Light white noise (SNR 20-40 dB) goes over the whole. Words: 67 common
function words (35 % of tokens) and a fixed random draw of ``--content-words``
(150) content words from the wamerican word list (3-9 lower-case letters);
held-out sentences are new draws from the same words and voices with new speeds,
pitches, pauses and noise (closed vocabulary, seen voices: an easy, honest
in-domain test set, not a general recogniser).

Model: 80-dim Kaldi fbank (torchaudio.compliance.kaldi.fbank, 25 ms window, 10 ms
hop, global mean and variance normalisation of the training set) -> two 3x3
stride-2 convolutions (16 channels) with batch norm (4x subsampling: 40 ms
frames) -> linear (192) -> five residual 1-D convolution blocks (kernel 5, batch
norm, ReLU: about 1 s of receptive field) -> one bidirectional LSTM layer (96 per
direction, residual) -> layer norm: the encoder states h. The prediction network is an
embedding and a 1-layer LSTM (192) started from the blank, giving p. The joiner:
``ctc(h) + joint(tanh(enc_out(h) + pred_out(p)))`` -> V, where ``ctc`` is the
linear CTC head over h (so the transducer starts from what CTC pre-training taught
the encoder; with the tanh term alone the transducer stayed at the level of its
prediction network's language model, 100 % WER) and the tanh term (192) carries the
label context. Labels are SentencePiece BPE pieces (``--vocab-size`` 512, blank = id 0,
trained on the training text: most words are one ``▁word`` piece). Training:
``--ctc-epochs`` epochs of CTC (``torch.nn.functional.ctc_loss``, same blank) on a
linear head over the encoder, then ``--epochs`` epochs of ``rnntool.rnnt_loss``
(blank 0) plus that CTC loss (weight 0.3). Adam (3e-3, warm-up, cosine decay),
batches of 16 utterances of similar length, SpecAugment-style frequency masks,
fixed seeds and a fixed number of epochs; greedy decoding (at most 5 symbols a
frame) for the WER.

Needs, beside rnntool: torch, torchaudio, sentencepiece, h5py, and the Debian
packages espeak-ng and wamerican::

    apt-get update && apt-get install -y espeak-ng wamerican
    make bench-env                           # torch + torchaudio + rnntool in .bench
    .bench/bin/pip install sentencepiece
    nice -n 5 .bench/bin/python scripts/make_speech_sample.py

The output is the same for the same seed, espeak-ng version, torch version and
torch thread count (``--threads``, default 1, so that the result does not depend
on the machine's core count). The wall time of the committed
sample's run is in the README (``info.json`` has its training minutes).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn

import rnntool
from rnntool import DumpWriter

SR = 16000
ESPEAK_SR = 22050
FRAME_SHIFT = 0.04  # seconds per logit frame (10 ms fbank hop x 4)
WORDLIST = "/usr/share/dict/american-english"
_FUNCTION_TEXT = """the a of to and in is it that for on with as was he she they we you
at by from this be are not or his her have but an one all my their there what so up out
if about who get which go me when can like no just him know into your some them than
then now only over also back after"""
FUNCTION_WORDS = _FUNCTION_TEXT.split()
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan",
          "en-gb-x-gbcwmd"]
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m7", "+f1", "+f2", "+f3", "+f4", "+klatt",
            "+klatt4"]


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- speech
def pick_words(seed: int, n_content: int) -> list[str]:
    words = Path(WORDLIST).read_text(encoding="utf-8").split()
    ok = sorted({w for w in words if re.fullmatch(r"[a-z]{3,9}", w)} - set(FUNCTION_WORDS))
    return sorted(random.Random(seed).sample(ok, n_content))


def make_sentences(rng: random.Random, n: int, content: list[str]) -> list[dict]:
    out = []
    for _ in range(n):
        k = rng.randint(3, 12)
        words = [rng.choice(FUNCTION_WORDS) if rng.random() < 0.35 else rng.choice(content)
                 for _ in range(k)]
        out.append({
            "words": words,
            "voice": rng.choice(VOICES) + rng.choice(VARIANTS),
            "speed": rng.randint(135, 205),
            "pitch": rng.randint(25, 75),
            "seed": rng.randrange(2**31),
        })
    return out


def espeak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One word, as espeak-ng says it alone: float32 samples at 22.05 kHz."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                          "--stdout", word], capture_output=True, check=True).stdout
    at = wav.find(b"data")
    if wav[:4] != b"RIFF" or at < 0:
        raise RuntimeError(f"espeak-ng gave no WAV for {word!r} ({voice})")
    pcm = np.frombuffer(wav[at + 8:], dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def synthesise_words(sentences: list[dict], jobs: int) -> dict:
    """(word, voice, speed, pitch) -> trimmed 16 kHz samples, for every word needed."""
    import torchaudio.functional as AF

    keys = sorted({(w, s["voice"], s["speed"], s["pitch"]) for s in sentences
                   for w in s["words"]})
    with ThreadPoolExecutor(jobs) as pool:
        raw = list(pool.map(lambda k: espeak(*k), keys))
    out = {}
    for k, x in zip(keys, raw, strict=True):
        y = AF.resample(torch.from_numpy(x), ESPEAK_SR, SR).numpy()
        loud = np.flatnonzero(np.abs(y) >= 10 ** (-50 / 20) * np.abs(y).max())
        out[k] = y[loud[0]: loud[-1] + 1].copy()
    return out


def assemble(s: dict, words: dict) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """The sentence's waveform and (word, start s, end s) of each word."""
    rng = np.random.default_rng(s["seed"])
    parts, times, at = [], [], 0

    def pause(lo, hi):
        nonlocal at
        n = int(rng.integers(int(lo * SR), int(hi * SR) + 1))
        parts.append(np.zeros(n, np.float32))
        at += n

    pause(0.15, 0.4)
    for i, w in enumerate(s["words"]):
        if i:
            if rng.random() < 0.1:
                pause(0.4, 0.9)
            else:
                pause(0.03, 0.25)
        x = words[(w, s["voice"], s["speed"], s["pitch"])]
        times.append((w, at / SR, (at + len(x)) / SR))
        parts.append(x)
        at += len(x)
    pause(0.15, 0.4)
    wave = np.concatenate(parts)
    speech_rms = float(np.sqrt(np.mean(np.concatenate(
        [words[(w, s["voice"], s["speed"], s["pitch"])] for w in s["words"]]) ** 2)))
    snr_db = rng.uniform(20, 40)
    wave = wave + rng.normal(0, speech_rms * 10 ** (-snr_db / 20), len(wave)).astype(np.float32)
    wave *= 10 ** (rng.uniform(-6, 0) / 20) * 0.5 / max(1e-6, float(np.abs(wave).max()))
    return wave.astype(np.float32), times


def fbank(wave: np.ndarray) -> torch.Tensor:
    import torchaudio.compliance.kaldi as kaldi

    return kaldi.fbank(torch.from_numpy(wave)[None] * 32768, sample_frequency=SR,
                       num_mel_bins=80, frame_length=25.0, frame_shift=10.0, dither=0.0)


# --------------------------------------------------------------------------- model
def subsampled(n: torch.Tensor) -> torch.Tensor:
    """Frames out of the two 3x3 stride-2 convolutions (no padding) for n fbank frames."""
    return ((n - 1) // 2 - 1) // 2


class ConvBlock(nn.Module):
    """x + dropout(relu(batchnorm(conv1d(x)))): one residual 1-D convolution block."""

    def __init__(self, H: int, kernel: int):
        super().__init__()
        self.conv = nn.Conv1d(H, H, kernel, padding=kernel // 2)
        self.norm = nn.BatchNorm1d(H)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T) -> (B, H, T)."""
        return x + self.drop(torch.relu(self.norm(self.conv(x))))


class Transducer(nn.Module):
    def __init__(self, V: int, C: int = 16, H: int = 192, P: int = 192, J: int = 192,
                 blocks: int = 5, kernel: int = 5):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, C, 3, 2), nn.BatchNorm2d(C), nn.ReLU(),
                                  nn.Conv2d(C, C, 3, 2), nn.BatchNorm2d(C), nn.ReLU())
        self.proj = nn.Linear(C * 19, H)  # 80 -> 39 -> 19 frequency bins
        self.blocks = nn.Sequential(*[ConvBlock(H, kernel) for _ in range(blocks)])
        self.lstm = nn.LSTM(H, H // 2, 1, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(H)
        self.embed = nn.Embedding(V, 128)
        self.predictor = nn.LSTM(128, P, 1, batch_first=True)
        self.enc_out = nn.Linear(H, J)
        self.pred_out = nn.Linear(P, J)
        self.joint = nn.Linear(J, V)
        self.ctc = nn.Linear(H, V)  # CTC head, also the joiner's encoder-only term

    def hidden(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, 80) normalised fbank -> (B, T, H) encoder states, T = subsampled(N)."""
        x = self.conv(feats[:, None])  # (B, C, T, 19)
        x = self.proj(x.permute(0, 2, 1, 3).flatten(2))
        x = self.blocks(x.transpose(1, 2)).transpose(1, 2)
        return self.norm(x + self.lstm(x)[0])

    def join(self, hidden: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Joint logits (..., V) of encoder states (..., H) and prediction outputs (..., J)
        (broadcast): the CTC head's logits plus joint(tanh(enc_out(hidden) + pred)), so
        that the transducer starts from what CTC pre-training taught the encoder."""
        return self.ctc(hidden) + self.joint(torch.tanh(self.enc_out(hidden) + pred))

    def predict(self, labels: torch.Tensor, state=None):
        """(B, S) labels -> (B, S, J); the caller puts the blank (0) first."""
        y, state = self.predictor(self.embed(labels), state)
        return self.pred_out(y), state

    def ctc_log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) encoder states -> (B, T, V) CTC log-probabilities."""
        return self.ctc(hidden).log_softmax(-1)

    def forward(self, feats, labels):
        """Joint logits (B, T, S+1, V) and the CTC head's log-probabilities (B, T, V)."""
        h = self.hidden(feats)
        start = torch.zeros(labels.shape[0], 1, dtype=labels.dtype)
        pred, _ = self.predict(torch.cat([start, labels], 1))
        return self.join(h[:, :, None], pred[:, None]), self.ctc_log_probs(h)


@torch.no_grad()
def greedy(model: Transducer, feats: torch.Tensor, max_symbols: int = 5) -> list[int]:
    """Greedy transducer decoding of one utterance's (N, 80) features: the label ids."""
    h = model.hidden(feats[None])[0]
    hyp, state = [], None
    pred, state_next = model.predict(torch.zeros(1, 1, dtype=torch.long), state)
    for t in range(h.shape[0]):
        for _ in range(max_symbols):
            k = int(model.join(h[t], pred[0, 0]).argmax())
            if k == 0:
                break
            hyp.append(k)
            state = state_next
            pred, state_next = model.predict(torch.tensor([[k]]), state)
    return hyp


def edit_distance(a: list[str], b: list[str]) -> int:
    d = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, y in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (x != y))
    return d[-1]


def pad_batch(items, feats, labels):
    B = len(items)
    N = torch.tensor([feats[i].shape[0] for i in items])
    U = torch.tensor([len(labels[i]) for i in items])
    x = torch.zeros(B, int(N.max()), 80)
    y = torch.zeros(B, int(U.max()), dtype=torch.long)
    for b, i in enumerate(items):
        x[b, : N[b]] = feats[i]
        y[b, : U[b]] = torch.tensor(labels[i])
    return x, y, subsampled(N), U


def spec_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x = x.clone()
    for b in range(x.shape[0]):
        for _ in range(2):
            w = int(torch.randint(0, 11, (1,), generator=g))
            f0 = int(torch.randint(0, 80 - w + 1, (1,), generator=g))
            x[b, :, f0: f0 + w] = 0
    return x


# --------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="sample_data/speech")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2000, help="training sentences")
    ap.add_argument("--heldout", type=int, default=120,
                    help="held-out sentences (the WER)")
    ap.add_argument("--lattice-utts", type=int, default=100,
                    help="the first this many held-out utterances go to the lattice dump "
                         "and the CTM")
    ap.add_argument("--dump-max-words", type=int, default=4,
                    help="the full dump holds the first held-out utterances of at most "
                         "this many words ...")
    ap.add_argument("--dump-mb", type=float, default=3.0,
                    help="... while their float16 logits total at most this many MB")
    ap.add_argument("--content-words", type=int, default=150)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--ctc-epochs", type=int, default=4,
                    help="epochs of CTC-only pre-training of the encoder")
    ap.add_argument("--epochs", type=int, default=6, help="epochs of transducer training")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ctc-weight", type=float, default=0.3,
                    help="weight of the auxiliary CTC loss during transducer training")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (the bits depend on it)")
    ap.add_argument("--jobs", type=int, default=2, help="espeak-ng processes at once")
    args = ap.parse_args()

    import sentencepiece as spm

    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    espeak_version = subprocess.run(["espeak-ng", "--version"], capture_output=True,
                                    text=True, check=True).stdout.strip()
    log(espeak_version)

    # ---- text and speech
    rng = random.Random(args.seed)
    content = pick_words(args.seed, args.content_words)
    train = make_sentences(rng, args.train, content)
    held = make_sentences(rng, args.heldout, content)
    words = synthesise_words(train + held, args.jobs)
    log(f"synthesised {len(words)} word renditions ({time.time() - t0:.0f} s)")
    feats, times = [], []
    for s in train + held:
        wave, tm = assemble(s, words)
        feats.append(fbank(wave))
        times.append(tm)
    del words
    tr_feats = torch.cat(feats[: args.train])
    mean, std = tr_feats.mean(0), tr_feats.std(0)
    del tr_feats
    feats = [((f - mean) / std) for f in feats]
    hours = sum(f.shape[0] for f in feats[: args.train]) * 0.01 / 3600
    log(f"features: {hours:.2f} h of training speech ({time.time() - t0:.0f} s)")

    # ---- subword vocabulary
    texts = [" ".join(s["words"]) for s in train + held]
    text_file = out / "train.txt.tmp"
    text_file.write_text("\n".join(texts[: args.train]) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text_file), model_prefix=str(out / "bpe"), model_type="bpe",
        vocab_size=args.vocab_size, character_coverage=1.0, pad_id=0, pad_piece="<blank>",
        unk_id=1, bos_id=-1, eos_id=-1, normalization_rule_name="identity",
        num_threads=1, minloglevel=2)
    text_file.unlink()
    sp = spm.SentencePieceProcessor(model_file=str(out / "bpe.model"))
    V = sp.get_piece_size()
    vocab = [sp.id_to_piece(i) for i in range(V)]
    labels = [sp.encode(t) for t in texts]
    n_words = len({w for t in texts for w in t.split()})
    whole = sum(len(sp.encode(w)) == 1 for w in {w for t in texts for w in t.split()})
    log(f"BPE: V = {V} (blank 0), {np.mean([len(y) for y in labels]):.1f} pieces per "
        f"sentence; {whole} of the {n_words} words are one piece")

    # ---- training: CTC pre-training of the encoder, then the transducer
    model = Transducer(V)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    order = sorted(range(args.train), key=lambda i: feats[i].shape[0])
    batches = [order[i: i + args.batch] for i in range(0, len(order), args.batch)]
    steps = (args.ctc_epochs + args.epochs) * len(batches)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warm = max(1, min(300, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.02, min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * s / steps)))))
    g = torch.Generator().manual_seed(args.seed + 1)
    shuffle = random.Random(args.seed + 2)
    t_train = time.time()
    curve = []
    for epoch in range(1, args.ctc_epochs + args.epochs + 1):
        ctc_only = epoch <= args.ctc_epochs
        model.train()
        shuffle.shuffle(batches)
        total = ctc_total = tokens = 0.0
        for items in batches:
            x, y, T, U = pad_batch(items, feats, labels)
            x = spec_augment(x, g)
            if ctc_only:
                ctc_lp = model.ctc_log_probs(model.hidden(x))
                loss = torch.zeros(())
            else:
                logits, ctc_lp = model(x, y)
                loss = rnntool.rnnt_loss(logits, y, T, U, blank=0, reduction="sum")
            ctc = nn.functional.ctc_loss(ctc_lp.transpose(0, 1), y, T, U, blank=0,
                                         reduction="sum", zero_infinity=True)
            objective = ctc if ctc_only else loss + args.ctc_weight * ctc
            opt.zero_grad()
            (objective / float(U.sum())).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item()
            ctc_total += ctc.item()
            tokens += float(U.sum())
        if not ctc_only:
            curve.append(round(total / tokens, 4))
        what = "CTC pre-training" if ctc_only else f"transducer {total / tokens:.3f},"
        log(f"epoch {epoch}: loss/token: {what} CTC {ctc_total / tokens:.3f} "
            f"({time.time() - t_train:.0f} s training)")
    train_s = time.time() - t_train
    model.eval()

    # ---- held-out greedy WER
    held_ids = range(args.train, args.train + args.heldout)
    errors = n_ref = 0
    for i in held_ids:
        hyp = sp.decode(greedy(model, feats[i])).split()
        errors += edit_distance(texts[i].split(), hyp)
        n_ref += len(texts[i].split())
    wer = errors / n_ref
    log(f"held-out greedy WER: {100 * wer:.1f} % ({errors}/{n_ref} words, "
        f"{args.heldout} utterances)")

    # ---- the dumps (lattice: every held-out utterance; full: the short ones) and CTM
    full, lat, ctm = out / "speech.h5", out / "speech-lattice.h5", out / "speech.ctm"
    stored_by = "torchaudio.functional.rnnt_loss"
    try:
        from torchaudio.functional import rnnt_loss as other_loss
    except ImportError:  # pragma: no cover - the generating environment lacks torchaudio
        stored_by = "rnntool.reference (float64)"
        other_loss = None
    ctm_lines, in_full, full_bytes = [], [], 0
    with (DumpWriter(full, blank=0, vocab=vocab, compression="gzip",
                     frame_shift=FRAME_SHIFT) as w,
          DumpWriter(lat, blank=0, vocab=vocab, compression="gzip", kind="lattice",
                     frame_shift=FRAME_SHIFT) as lw,
          torch.no_grad()):
        for i in held_ids[: args.lattice_utts]:
            utt = f"heldout{i - args.train:03d}"
            y = torch.tensor([labels[i]])
            logits = model(feats[i][None], y)[0][0].to(torch.float16)
            T, U = torch.tensor([logits.shape[0]]), torch.tensor([y.shape[1]])
            if other_loss is not None:
                stored = float(other_loss(logits.float()[None], y.int(), T.int(), U.int(),
                                          blank=0, reduction="none")[0])
            else:
                from rnntool.reference import reference_utterance_loss

                stored = float(reference_utterance_loss(logits.double(), y[0], blank=0))
            lw.add(utt, logits, y[0], text=texts[i], loss=stored)
            size = logits.numel() * 2
            if (len(texts[i].split()) <= args.dump_max_words
                    and full_bytes + size <= args.dump_mb * 1e6):
                w.add(utt, logits, y[0], text=texts[i], loss=stored)
                in_full.append(utt)
                full_bytes += size
            for word, start, end in times[i]:
                ctm_lines.append(f"{utt} 1 {start:.4f} {end - start:.4f} {word}")
    ctm.write_text("\n".join(ctm_lines) + "\n", encoding="utf-8")

    # ---- word-start errors, measured the way a user would: rnntool align
    rows = subprocess.run([sys.executable, "-m", "rnntool", "align", str(lat), "-q",
                           "-f", "tsv"], capture_output=True, text=True, check=True).stdout
    first = {}
    for line in rows.splitlines()[1:]:
        f = line.split("\t")
        utt, token, frame = f[0], f[3], int(f[4])
        if token.startswith("\u2581"):
            first.setdefault(utt, []).append(frame * FRAME_SHIFT)
    starts = {}
    for line in ctm_lines:
        utt, _, start, _, _ = line.split()
        starts.setdefault(utt, []).append(float(start))
    err_ms = np.array([1000 * (e - s) for utt in starts
                       for e, s in zip(first[utt], starts[utt], strict=True)])
    med, p90 = np.median(np.abs(err_ms)), np.percentile(np.abs(err_ms), 90)
    log(f"word starts vs first-token Viterbi frames ({len(err_ms)} words): |error| "
        f"median {med:.0f} ms, 90th percentile {p90:.0f} ms; signed median "
        f"{np.median(err_ms):.0f} ms")

    info = {
        "seed": args.seed, "espeak_ng": espeak_version, "torch": torch.__version__,
        "sentencepiece": spm.__version__, "threads": args.threads,
        "train_sentences": args.train, "train_hours": round(hours, 3),
        "heldout_sentences": args.heldout, "content_words": args.content_words,
        "function_words": len(FUNCTION_WORDS), "words": n_words, "vocab_size": V,
        "ctc_epochs": args.ctc_epochs, "epochs": args.epochs, "batch": args.batch,
        "lr": args.lr, "ctc_weight": args.ctc_weight,
        "train_loss_per_token": curve, "train_minutes": round(train_s / 60, 1),
        "frame_shift": FRAME_SHIFT, "heldout_greedy_wer": round(wer, 4),
        "heldout_word_errors": errors, "heldout_words": n_ref,
        "full_dump_utterances": len(in_full), "lattice_dump_utterances": len(starts),
        "stored_loss": stored_by,
        "word_start_abs_error_ms": {"median": round(float(med), 1),
                                    "p90": round(float(p90), 1),
                                    "signed_median": round(float(np.median(err_ms)), 1),
                                    "words": len(err_ms)},
    }
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out}: {len(in_full)} utterances in full, {len(starts)} in the lattice "
        f"dump and the CTM; training {train_s / 60:.1f} min, all "
        f"{(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
