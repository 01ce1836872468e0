"""The committed speech sample (``sample_data/speech/``, made by
``scripts/make_speech_sample.py``): the dumps read, every command runs on them, the
CTM and the dumps agree, the dumps' stored loss (another implementation's) is
rnntool's within float32 rounding of the same float16 logits, and the first-token
Viterbi emissions of ``rnntool align`` land near the true word starts."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from helpers import ROOT, invoke, rows_of

from rnntool import rnnt_loss
from rnntool.reader import DumpReader

SPEECH = ROOT / "sample_data" / "speech"
FULL = SPEECH / "speech.h5"
LATTICE = SPEECH / "speech-lattice.h5"
CTM = SPEECH / "speech.ctm"
INFO = SPEECH / "info.json"
WORD = "\u2581"  # SentencePiece's word-start marker
FRAME_SHIFT = 0.04  # seconds per logit frame: 10 ms fbank hop, 4x subsampling
# Bounds on |first-token emission time - true word start| over the lattice dump's
# words: the committed sample measures a median of 172 ms and a 90th percentile of
# 346 ms (info.json); an untrained model's dump measured 685-793 ms and 2.1-2.7 s.
MEDIAN_BOUND = 0.30  # seconds
P90_BOUND = 0.60


def read_ctm() -> dict[str, list[tuple[float, float, str]]]:
    """utt_id -> [(start, duration, word), ...] in file order."""
    out: dict[str, list] = {}
    for n, line in enumerate(CTM.read_text(encoding="utf-8").splitlines(), 1):
        f = line.split()
        assert len(f) == 5 and f[1] == "1", f"{CTM.name}:{n}: {line!r}"
        out.setdefault(f[0], []).append((float(f[2]), float(f[3]), f[4]))
    return out


def dump_utts(path) -> dict[str, dict]:
    """utt_id -> {T, U, labels, text, loss} of a dump, read with rnntool's reader."""
    out = {}
    with DumpReader(path) as r:
        for utt_id in r.utt_ids:
            info = r.info(utt_id)
            out[utt_id] = {"T": info.T, "U": info.U, "labels": r.labels(utt_id, info),
                           "text": str(info.attrs["text"]), "loss": float(info.attrs["loss"])}
    return out


def vocab_of(path) -> list[str]:
    with h5py.File(path, "r") as f:
        return [t.decode() if isinstance(t, bytes) else str(t) for t in f["vocab"][()]]


def test_dumps_read_with_frame_shift_and_sizes():
    for path, kind in ((FULL, "full"), (LATTICE, "lattice")):
        with h5py.File(path, "r") as f:
            assert f.attrs["dump_kind"] == kind
            assert float(f.attrs["frame_shift"]) == FRAME_SHIFT
            assert int(f.attrs["blank"]) == 0
    # the sample is committed: a few MB in all
    assert sum(p.stat().st_size for p in SPEECH.iterdir()) < 6.5e6
    with h5py.File(FULL, "r") as f:
        dtypes = {f["utts"][u]["logits"].dtype for u in f["utts"]}
        assert dtypes == {np.dtype(np.float16)}
    full, lattice = dump_utts(FULL), dump_utts(LATTICE)
    assert 6 <= len(full) <= 48 and len(lattice) >= 100
    # the full dump's utterances are some of the lattice dump's, with the same labels
    assert set(full) <= set(lattice)
    for utt_id, u in full.items():
        assert u["labels"].tolist() == lattice[utt_id]["labels"].tolist()
        assert u["text"] == lattice[utt_id]["text"] and u["T"] == lattice[utt_id]["T"]
    r = invoke("inspect", FULL, LATTICE, "-q", "-f", "tsv")
    assert r.exit_code == 0, r.stderr
    rows = rows_of(r.stdout)
    assert [row["kind"] for row in rows] == ["full", "lattice"]
    assert all(row["problems"] == "0" for row in rows), rows


def test_vocab_is_sentencepiece_with_word_markers():
    vocab = vocab_of(FULL)
    assert 128 <= len(vocab) <= 512
    assert vocab[0] == "<blank>"
    assert vocab == vocab_of(LATTICE)
    marked = [t for t in vocab if t.startswith(WORD)]
    assert len(marked) >= 20 and f"{WORD}the" in vocab
    # the SentencePiece model's own piece list, in id order
    pieces = [line.split("\t")[0] for line in
              (SPEECH / "bpe.vocab").read_text(encoding="utf-8").splitlines()]
    assert pieces == vocab
    with DumpReader(FULL) as r:
        assert r.vocab_size == len(vocab)


def test_labels_spell_the_text():
    vocab = vocab_of(LATTICE)
    for utt_id, u in dump_utts(LATTICE).items():
        pieces = "".join(vocab[i] for i in u["labels"])
        assert pieces.replace(WORD, " ").strip() == u["text"], utt_id


def test_ctm_matches_the_dumps():
    ctm, utts = read_ctm(), dump_utts(LATTICE)
    assert list(ctm) == sorted(ctm) and set(ctm) == set(utts)
    for utt_id, words in ctm.items():
        assert " ".join(w for _, _, w in words) == utts[utt_id]["text"]
        ends = 0.0
        for start, dur, _ in words:
            assert start >= ends and dur > 0, (utt_id, words)
            ends = start + dur
        # the audio covers every word: T logit frames of 40 ms, within the
        # front end's cut (two 3x3 stride-2 convolutions, 25 ms fbank windows)
        assert ends <= utts[utt_id]["T"] * FRAME_SHIFT + 0.1, utt_id


def test_stored_loss_agrees_with_rnntool():
    """stored_loss is torchaudio's (or the float64 reference's) on the stored float16
    logits, widened to float32: rnntool's loss on the same values agrees to float32
    rounding, and the lattice dump stores the same number."""
    info = json.loads(INFO.read_text(encoding="utf-8"))
    assert info["stored_loss"] in ("torchaudio.functional.rnnt_loss",
                                   "rnntool.reference (float64)")
    lattice = dump_utts(LATTICE)
    with h5py.File(FULL, "r") as f:
        for utt_id, g in f["utts"].items():
            x = torch.from_numpy(g["logits"][()].astype(np.float32))[None]
            y = torch.from_numpy(g["labels"][()].astype(np.int64))[None]
            T, U = torch.tensor([x.shape[1]]), torch.tensor([y.shape[1]])
            ours = float(rnnt_loss(x, y, T, U, blank=0, reduction="none")[0])
            stored = float(g.attrs["loss"])
            assert math.isfinite(ours) and ours > 0
            assert abs(ours - stored) <= 1e-4 * (1 + abs(stored)), (utt_id, ours, stored)
            assert lattice[utt_id]["loss"] == stored


def test_score_full_and_lattice_same_bits():
    full = invoke("score", FULL, "-q", "-f", "tsv")
    lat = invoke("score", LATTICE, "-q", "-f", "tsv", "--utt-list", "-",
                 input="\n".join(dump_utts(FULL)) + "\n")
    assert full.exit_code == 0, full.stderr
    assert lat.exit_code == 0, lat.stderr
    a, b = rows_of(full.stdout), rows_of(lat.stdout)
    assert len(a) == len(dump_utts(FULL))
    assert [(r["utt_id"], r["loss"]) for r in a] == [(r["utt_id"], r["loss"]) for r in b]
    for r in a:
        assert abs(float(r["loss_diff"])) <= 1e-4 * (1 + float(r["stored_loss"])), r


def word_start_errors(path) -> np.ndarray:
    """Each word's first-token Viterbi emission time (``rnntool align``'s frame times the
    frame shift) minus its true start (the CTM), seconds, over the dump's utterances."""
    r = invoke("align", path, "-q", "-f", "tsv")
    assert r.exit_code == 0, r.stderr
    rows = rows_of(r.stdout)
    utts, ctm = dump_utts(path), read_ctm()
    assert len(rows) == sum(u["U"] for u in utts.values())
    errors = []
    for utt_id in utts:
        mine = [row for row in rows if row["utt_id"] == utt_id]
        frames = [int(row["frame"]) for row in mine]
        assert frames == sorted(frames) and frames[-1] < utts[utt_id]["T"]
        firsts = [int(row["frame"]) * FRAME_SHIFT for row in mine
                  if row["token"].startswith(WORD)]
        words = ctm[utt_id]
        assert len(firsts) == len(words)
        errors += [e - start for e, (start, _, _) in zip(firsts, words, strict=True)]
    return np.array(errors)


def test_align_emits_each_word_near_its_start():
    """A measurement with a bound: the sample's first-token emissions follow the true word
    starts (late, as a transducer's are) by a fraction of a word (words last 0.15-1.5 s,
    0.5 s on average; pauses between them 30-250 ms). An untrained or mis-paired sample
    (its emissions anywhere in the utterance) is off by most of a second."""
    err = word_start_errors(LATTICE)
    assert len(err) >= 500
    info = json.loads(INFO.read_text(encoding="utf-8"))["word_start_abs_error_ms"]
    assert info["words"] == len(err)
    assert abs(np.median(np.abs(err)) * 1000 - info["median"]) < 0.1
    assert np.median(np.abs(err)) < MEDIAN_BOUND
    assert np.percentile(np.abs(err), 90) < P90_BOUND
    # the full dump's utterances align as in the lattice dump
    full = word_start_errors(FULL)
    assert len(full) < len(err) and np.median(np.abs(full)) < MEDIAN_BOUND


def test_timestamps_delay_against_the_true_word_times(tmp_path):
    """``rnntool timestamps --ref`` on the sample: every word of the CTM matched, and the
    emission delay the README quotes (the Viterbi and the expected start ~170 ms late,
    within the bounds the alignment test uses), the summary file equal to the rows."""
    out, summary = tmp_path / "words.tsv", tmp_path / "delay.json"
    r = invoke("timestamps", LATTICE, "--ref", CTM, "--summary", summary, "-o", out, "-q")
    assert r.exit_code == 0, r.stderr
    stats = json.loads(summary.read_text(encoding="utf-8"))
    n_words = sum(len(w) for w in read_ctm().values())
    assert stats["count"] == n_words
    rows = list(rows_of(out.read_text(encoding="utf-8"), "tsv"))
    assert len(rows) == n_words
    start = np.array([float(r["start_offset_ms"]) for r in rows])
    assert stats["start_offset_ms"]["median"] == pytest.approx(np.median(start), abs=1e-6)
    for key in ("start_offset_ms", "expected_start_offset_ms"):
        assert 0 < stats[key]["median"] < 1000 * MEDIAN_BOUND
        assert stats[key]["p90"] < 1000 * P90_BOUND
    # the reported start is the first token's Viterbi frame x the frame shift
    assert all(math.isclose(float(r["start"]), int(r["start_frame"]) * FRAME_SHIFT,
                            abs_tol=1e-9) for r in rows)


@pytest.mark.parametrize("path", [FULL, LATTICE], ids=["full", "lattice"])
def test_plot_three_utterances(tmp_path, path):
    ids = sorted(dump_utts(FULL))[:3]
    args = [a for i in ids for a in ("--utt", i)]
    r = invoke("plot", path, "-d", tmp_path, "-q", *args)
    assert r.exit_code == 0, r.stderr
    for i in ids:
        png = tmp_path / f"{i}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
