"""Train a small speech transducer on synthesised speech and dump its held-out logits.

STATUS (work in progress, issue 13, 2026-11-30): the pipeline runs end to end
(synthesis with exact word times, features, training, dumps, CTM), but the model
does not learn yet: held-out greedy WER 100 % after 16 epochs (transducer loss
per token 1.60 and creeping; the auxiliary CTC loss stuck at 5.2, i.e. the encoder
never locks onto the audio). Its outputs are not committed; sample_data/sample.h5
stays the README's sample until this trains.

Makes ``sample_data/speech/``:

- ``speech.h5``: the joint-network logits of held-out utterances (float16, keyed
  layout, blank 0, the SentencePiece vocabulary with its ``▁`` word marker kept,
  each utterance's ``text``, and ``stored_loss``, computed at dump time by
  torchaudio's ``rnnt_loss`` on the stored float16 values; by rnntool's float64
  reference where torchaudio is missing). Root attribute ``frame_shift`` = 0.04:
  seconds per logit frame.
- ``speech-lattice.h5``: the same utterances as a lattice dump.
- ``speech.ctm``: the true time of every word of those utterances, in seconds
  (``utt_id 1 start duration word``).
- ``bpe.model``, ``bpe.vocab``: the SentencePiece BPE model the labels use.
- ``info.json``: seeds, versions, sizes, the held-out greedy WER and the word-start
  errors of ``rnntool align``.

Speech: each sentence (3-12 words) has a voice (an espeak-ng English voice and a
variant), a speed and a pitch. Each word is synthesised alone by espeak-ng,
resampled from 22.05 to 16 kHz, trimmed of leading and trailing silence (first and
last sample above -50 dB of the word's peak) and the words joined with random pauses
(30-250 ms, one in ten 400-900 ms), so every word's start and end is known to the
sample. Light white noise (SNR 20-40 dB) goes over the whole. Words: 67 common
function words (35 % of tokens) and a fixed random draw of 250 content words from
the wamerican word list (3-9 lower-case letters); held-out sentences are new
draws from the same words and voices (closed vocabulary, seen voices: an easy,
honest in-domain test set, not a general recogniser).

Model: 80-dim Kaldi fbank (torchaudio.compliance.kaldi.fbank, 25 ms window, 10 ms
hop, global mean and variance normalisation) -> two 3x3 stride-2 convolutions (4x
subsampling: 40 ms frames) -> linear + layer norm -> 2-layer bidirectional LSTM
(160 per direction) ->
joiner (tanh of encoder + prediction projections, 160) -> V; the prediction
network is an embedding and a 1-layer LSTM (160) started from the blank. Labels
are SentencePiece BPE pieces (256, blank = id 0, trained on the training text).
Trained with ``rnntool.rnnt_loss`` (blank=0) on the CPU plus an auxiliary CTC
loss (``torch.nn.functional.ctc_loss``, same blank, weight 0.4) on a linear head
over the encoder states, which gets the encoder past the plateau where the
transducer only follows its prediction network; the CTC head is not used after
training. Adam (2e-3, warm-up, cosine decay), batches of 12, fixed seeds and a
fixed number of epochs; greedy decoding (at most 5 symbols a frame) for the WER.

Needs, beside rnntool: torch, torchaudio, sentencepiece, h5py, and the Debian
packages espeak-ng and wamerican::

    apt-get update && apt-get install -y espeak-ng wamerican
    make bench-env                                # torch + torchaudio in .bench
    .bench/bin/pip install --target /tmp/spgen sentencepiece
    PYTHONPATH=/tmp/spgen nice -n 19 .bench/bin/python scripts/make_speech_sample.py

On two shared CPU cores (nice 19): about 3 minutes of synthesis and features, 20
of training, 1 of decoding and dumping (espeak-ng 1.51, torch 2.14.1). The output
is the same for the same seed, espeak-ng version, torch version and thread count
(``--threads``, default 2).
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


class Transducer(nn.Module):
    def __init__(self, V: int, C: int = 32, H: int = 160, J: int = 160):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, C, 3, 2), nn.ReLU(), nn.Conv2d(C, C, 3, 2),
                                  nn.ReLU())
        # 80 -> 39 -> 19 frequency bins; the layer norm gets the encoder off the plateau
        self.proj = nn.Sequential(nn.Linear(C * 19, H), nn.LayerNorm(H))
        self.encoder = nn.LSTM(H, H, 2, batch_first=True, bidirectional=True, dropout=0.1)
        self.embed = nn.Embedding(V, 128)
        self.predictor = nn.LSTM(128, H, 1, batch_first=True)
        self.enc_out = nn.Linear(2 * H, J)
        self.pred_out = nn.Linear(H, J)
        self.joint = nn.Linear(J, V)
        self.ctc = nn.Linear(2 * H, V)  # auxiliary CTC head (training only)

    def hidden(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, 80) normalised fbank -> (B, T, 2H) encoder states, T = subsampled(N)."""
        x = self.conv(feats[:, None])  # (B, C, T, 19)
        x = self.proj(x.permute(0, 2, 1, 3).flatten(2))
        x, _ = self.encoder(x)
        return x

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, N, 80) normalised fbank -> (B, T, J)."""
        return self.enc_out(self.hidden(feats))

    def predict(self, labels: torch.Tensor, state=None):
        """(B, S) labels -> (B, S, J); the caller puts the blank (0) first."""
        y, state = self.predictor(self.embed(labels), state)
        return self.pred_out(y), state

    def forward(self, feats, labels):
        """Joint logits (B, T, S+1, V) and the CTC head's log-probabilities (B, T, V)."""
        h = self.hidden(feats)
        enc = self.enc_out(h)
        start = torch.zeros(labels.shape[0], 1, dtype=labels.dtype)
        pred, _ = self.predict(torch.cat([start, labels], 1))
        return (self.joint(torch.tanh(enc[:, :, None] + pred[:, None])),
                self.ctc(h).log_softmax(-1))


@torch.no_grad()
def greedy(model: Transducer, feats: torch.Tensor, max_symbols: int = 5) -> list[int]:
    enc = model.encode(feats[None])[0]
    hyp, state = [], None
    pred, state_next = model.predict(torch.zeros(1, 1, dtype=torch.long), state)
    for t in range(enc.shape[0]):
        for _ in range(max_symbols):
            k = int(model.joint(torch.tanh(enc[t] + pred[0, 0])).argmax())
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
    ap.add_argument("--train", type=int, default=1500, help="training sentences")
    ap.add_argument("--heldout", type=int, default=100, help="held-out sentences (WER)")
    ap.add_argument("--dump-utts", type=int, default=16,
                    help="held-out utterances dumped: the first ones of at most "
                         "--dump-max-words words (the size of full logits)")
    ap.add_argument("--dump-max-words", type=int, default=5)
    ap.add_argument("--content-words", type=int, default=250)
    ap.add_argument("--vocab-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ctc-weight", type=float, default=0.4,
                    help="weight of the auxiliary CTC loss on the encoder (training only)")
    ap.add_argument("--threads", type=int, default=2)
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
    log(f"BPE: V = {V} (blank 0), {np.mean([len(y) for y in labels]):.1f} pieces "
        f"per sentence")

    # ---- training
    model = Transducer(V)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    order = sorted(range(args.train), key=lambda i: feats[i].shape[0])
    batches = [order[i: i + args.batch] for i in range(0, len(order), args.batch)]
    steps = args.epochs * len(batches)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    warm = max(1, min(500, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.02, min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * s / steps)))))
    g = torch.Generator().manual_seed(args.seed + 1)
    shuffle = random.Random(args.seed + 2)
    t_train = time.time()
    curve = []
    for epoch in range(1, args.epochs + 1):
        model.train()
        shuffle.shuffle(batches)
        total = ctc_total = tokens = 0.0
        for items in batches:
            x, y, T, U = pad_batch(items, feats, labels)
            logits, ctc_lp = model(spec_augment(x, g), y)
            loss = rnntool.rnnt_loss(logits, y, T, U, blank=0, reduction="sum")
            ctc = nn.functional.ctc_loss(ctc_lp.transpose(0, 1), y, T, U, blank=0,
                                         reduction="sum", zero_infinity=True)
            opt.zero_grad()
            ((loss + args.ctc_weight * ctc) / float(U.sum())).backward()
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            total += loss.item()
            ctc_total += ctc.item()
            tokens += float(U.sum())
        curve.append(round(total / tokens, 4))
        log(f"epoch {epoch}: loss/token {total / tokens:.3f} (CTC {ctc_total / tokens:.3f}) "
            f"({time.time() - t_train:.0f} s training)")
    train_s = time.time() - t_train

    # ---- held-out greedy WER
    model.eval()
    errors = n_words = 0
    hyps = []
    for i in range(args.train, args.train + args.heldout):
        hyp = sp.decode(greedy(model, feats[i])).split()
        ref = texts[i].split()
        errors += edit_distance(ref, hyp)
        n_words += len(ref)
        hyps.append(" ".join(hyp))
    wer = errors / n_words
    log(f"held-out greedy WER: {100 * wer:.1f} % ({errors}/{n_words} words, "
        f"{args.heldout} utterances)")

    # ---- the dump: full logits, lattice, CTM
    dump_ids = [i for i in range(args.train, args.train + args.heldout)
                if len(texts[i].split()) <= args.dump_max_words][: args.dump_utts]
    full, lat, ctm = out / "speech.h5", out / "speech-lattice.h5", out / "speech.ctm"
    stored_by = "torchaudio.functional.rnnt_loss"
    try:
        from torchaudio.functional import rnnt_loss as other_loss
    except ImportError:  # pragma: no cover - the generating environment lacks torchaudio
        stored_by = "rnntool.reference (float64)"
        other_loss = None
    ctm_lines = []
    with (DumpWriter(full, blank=0, vocab=vocab, compression="gzip") as w,
          DumpWriter(lat, blank=0, vocab=vocab, kind="lattice") as lw,
          torch.no_grad()):
        for i in dump_ids:
            utt = f"heldout{i - args.train:03d}"
            x = feats[i][None]
            y = torch.tensor([labels[i]])
            logits = model(x, y)[0][0].to(torch.float16)
            T, U = torch.tensor([logits.shape[0]]), torch.tensor([y.shape[1]])
            if other_loss is not None:
                stored = float(other_loss(logits.float()[None], y.int(), T.int(), U.int(),
                                          blank=0, reduction="none")[0])
            else:
                from rnntool.reference import reference_utterance_loss

                stored = float(reference_utterance_loss(logits.double(), y[0], blank=0))
            w.add(utt, logits, y[0], text=texts[i], loss=stored)
            lw.add(utt, logits, y[0], text=texts[i], loss=stored)
            for word, start, end in times[i]:
                ctm_lines.append(f"{utt} 1 {start:.4f} {end - start:.4f} {word}")
    import h5py

    for path in (full, lat):
        with h5py.File(path, "r+") as f:
            f.attrs["frame_shift"] = FRAME_SHIFT
    ctm.write_text("\n".join(ctm_lines) + "\n", encoding="utf-8")

    # ---- word-start errors, measured the way a user would: rnntool align
    rows = subprocess.run([sys.executable, "-m", "rnntool", "align", str(full), "-q",
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
        "threads": args.threads, "train_sentences": args.train,
        "train_hours": round(hours, 3), "heldout_sentences": args.heldout,
        "content_words": args.content_words, "function_words": len(FUNCTION_WORDS),
        "vocab_size": V, "epochs": args.epochs, "lr": args.lr,
        "ctc_weight": args.ctc_weight, "train_loss_per_token": curve, "frame_shift": FRAME_SHIFT,
        "heldout_greedy_wer": round(wer, 4), "heldout_word_errors": errors,
        "heldout_words": n_words, "dumped_utterances": len(dump_ids),
        "stored_loss": stored_by,
        "word_start_abs_error_ms": {"median": round(float(med), 1),
                                    "p90": round(float(p90), 1),
                                    "signed_median": round(float(np.median(err_ms)), 1),
                                    "words": len(err_ms)},
    }
    (out / "info.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {out}: {len(dump_ids)} utterances; training {train_s / 60:.1f} min, "
        f"all {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
