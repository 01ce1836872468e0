"""rnntool timestamps: times from frames and the frame shift, word grouping, confidences
against float64 reference posteriors, the output formats as their own readers parse
them (SCTK's CTM fields, lhotse's SupervisionSegment, praatio's TextGrid reader), the
--ref delay report, and the frame_shift attribute of dumps (writer, reader, compact,
inspect). Engine-level properties run on every backend (the `backend` fixture: the
CPU and the CUDA kernels in Numba's simulator)."""

import json
import math
import os
import re

import h5py
import numpy as np
import pytest
import torch
from helpers import (
    examples,
    invoke,
    one_line_error,
    random_batch,
    rows_of,
    write_keyed_raw,
    write_lattice_raw,
    write_padded_raw,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from rnntool import align
from rnntool.dump import DumpError, DumpWriter
from rnntool.reader import DumpReader
from rnntool.reference import reference_rnnt_loss
from rnntool.timestamps import (
    CtmError,
    CtmWord,
    WordMismatch,
    check_words,
    ctm_lines,
    delay_rows,
    delay_summary,
    grouping_for,
    lhotse_supervision,
    read_ctm,
    units_of,
    utterance_times,
    word_groups,
)

VOCAB = ["<b>", "\u2581the", "\u2581c", "at", "\u2581sat", "\u2581", "s", "|"]
SHIFTS = [0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 1 / 75]


# --------------------------------------------------------------------------- a lattice with known emissions
def placed_logits(T: int, labels, frames, V: int, blank: int = 0) -> np.ndarray:
    """``(T, U+1, V)`` float32 logits whose one alignment with non-zero probability emits
    ``labels[u]`` at frame ``frames[u]`` (sorted): at (t, u) the next label has
    probability 1 when t = frames[u], the blank otherwise."""
    U = len(labels)
    x = np.full((T, U + 1, V), -np.inf, np.float32)
    for t in range(T):
        for u in range(U + 1):
            if u < U and frames[u] == t:
                x[t, u, labels[u]] = 0.0
            else:
                x[t, u, blank] = 0.0
    return x


def write_pair(tmp_path, utts: dict, *, frame_shift=0.04, vocab=VOCAB, name="d"):
    """A full dump and its lattice dump (DumpWriter, kind="lattice") of ``utts``: id ->
    (logits, labels, text or None)."""
    paths = []
    for kind in ("full", "lattice"):
        path = tmp_path / f"{name}-{kind}.h5"
        with DumpWriter(path, vocab=vocab, kind=kind, frame_shift=frame_shift) as w:
            for utt_id, (x, y, text) in utts.items():
                w.add(utt_id, x, np.asarray(y, np.int64), text=text)
        paths.append(path)
    return paths


def sentence_dump(tmp_path, frame_shift=0.04, name="d"):
    """Two utterances of the VOCAB with emissions at known frames: "the cats sat" (tokens
    ▁the ▁c at s ▁sat at frames 2 5 5 6 11) and "the" (▁ the... as ▁, ▁the)."""
    utts = {
        "u1": (placed_logits(14, [1, 2, 3, 6, 4], [2, 5, 5, 6, 11], len(VOCAB)),
               [1, 2, 3, 6, 4], "the cats sat"),
        "u2": (placed_logits(6, [1], [3], len(VOCAB)), [1], None),
    }
    return write_pair(tmp_path, utts, frame_shift=frame_shift, name=name)


@settings(deadline=None)
@given(data=st.data())
def test_emissions_placed_at_known_frames_give_exactly_those_times(data):
    T = data.draw(st.integers(1, 12))
    U = data.draw(st.integers(0, 6))
    frames = sorted(data.draw(st.lists(st.integers(0, T - 1), min_size=U, max_size=U)))
    labels = data.draw(st.lists(st.integers(1, 4), min_size=U, max_size=U))
    shift = data.draw(st.sampled_from(SHIFTS))
    x = torch.from_numpy(placed_logits(T, labels, frames, 5))[None]
    y = torch.tensor([labels or [1]])
    (al,) = align(x, y, torch.tensor([T]), torch.tensor([U]), blank=0, backend="cpu")
    times = utterance_times(al, np.array(labels, np.int64), None, frame_shift=shift,
                            grouping="token", window=0)
    assert [t.start_frame for t in times.tokens] == frames
    assert [t.end_frame for t in times.tokens] == [f + 1 for f in frames]
    assert [t.start for t in times.tokens] == [f * shift for f in frames]
    assert [t.end for t in times.tokens] == [(f + 1) * shift for f in frames]
    # One alignment has all the probability: expected frames are the frames, posteriors 1.
    np.testing.assert_allclose([t.expected_frame for t in times.tokens], frames, atol=1e-6)
    np.testing.assert_allclose([t.frame_posterior for t in times.tokens], 1.0, atol=1e-6)
    assert times.duration == T * shift


@pytest.mark.parametrize("kind", [0, 1], ids=["full", "lattice"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cli_times_are_frame_times_shift_on_full_and_lattice_dumps(tmp_path, kind, device):
    from rnntool import cuda as rcuda

    if device == "cuda" and not rcuda.SIMULATOR:
        pytest.skip("the cuda parameter runs the CUDA kernels in Numba's simulator")
    path = sentence_dump(tmp_path, frame_shift=0.03)[kind]
    got = invoke("timestamps", path, "--unit", "token", "-f", "jsonl", "-q",
                 "--device", device)
    assert got.exit_code == 0, got.output
    rows = [json.loads(line) for line in got.stdout.splitlines()]
    assert [(r["utt_id"], r["start_frame"]) for r in rows] == [
        ("u1", 2), ("u1", 5), ("u1", 5), ("u1", 6), ("u1", 11), ("u2", 3)]
    for r in rows:
        assert r["start"] == r["start_frame"] * 0.03
        assert r["end"] == (r["start_frame"] + 1) * 0.03 and r["end_frame"] == r["start_frame"] + 1
        assert r["frame_posterior"] == pytest.approx(1.0, abs=1e-6)
        assert r["expected_start"] == pytest.approx(r["start"], abs=1e-6)
    # Words: first token's start, last token's end.
    got = invoke("timestamps", path, "-f", "jsonl", "-q", "--device", device)
    words = [json.loads(line) for line in got.stdout.splitlines()]
    assert [(w["word"], w["start_frame"], w["end_frame"]) for w in words] == [
        ("the", 2, 3), ("cats", 5, 7), ("sat", 11, 12), ("the", 3, 4)]
    assert [w["start"] for w in words] == [f * 0.03 for f in (2, 5, 11, 3)]
    assert [w["end"] for w in words] == [f * 0.03 for f in (3, 7, 12, 4)]


def test_backends_and_dump_kinds_give_the_same_times(tmp_path):
    from rnntool import cuda as rcuda

    x, y, T, U = random_batch(3, 9, 4, len(VOCAB), seed=5, scale=3.0)
    utts = {f"r{b}": (x[b, : T[b], : U[b] + 1].numpy(), y[b, : U[b]].numpy(), None)
            for b in range(3)}
    out = []
    devices = ["cpu", "cuda"] if rcuda.SIMULATOR else ["cpu"]
    for path in write_pair(tmp_path, utts):
        for device in devices:
            got = invoke("timestamps", path, "--unit", "token", "-f", "jsonl", "-q",
                         "--device", device)
            assert got.exit_code == 0, got.output
            out.append([json.loads(line) for line in got.stdout.splitlines()])
    keys = ("utt_id", "position", "start_frame", "end_frame", "start", "end")
    for other in out[1:]:
        assert [[r[k] for k in keys] for r in other] == [[r[k] for k in keys] for r in out[0]]
        for a, b in zip(other, out[0], strict=True):
            for k in ("frame_posterior", "window_posterior", "expected_start"):
                assert a[k] == pytest.approx(b[k], abs=2e-5), k


# --------------------------------------------------------------------------- confidence
def reference_posteriors(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``(T, U)`` float64 P(label u emitted at t), from the reference's gradient w.r.t.
    log-prob inputs (d loss / d emit_lp[t, u] = -P(emit y_u at t)): independent of the
    engine's alpha and beta."""
    T, U1, _ = x.shape
    U = U1 - 1
    logp = torch.log_softmax(x.double(), -1)[None].requires_grad_(True)
    reference_rnnt_loss(logp, y[None], torch.tensor([T]), torch.tensor([U]),
                        fused_log_softmax=False).sum().backward()
    g = logp.grad[0, :, :U].gather(-1, y.view(1, U, 1).expand(T, U, 1))[..., 0]
    return (-g).numpy()


def test_confidences_equal_the_reference_posteriors(backend):
    @settings(max_examples=examples(backend, cuda=6))
    @given(T=st.integers(1, 8), U=st.integers(1, 4), seed=st.integers(0, 2**16),
           window=st.integers(0, 3), scale=st.sampled_from([0.5, 2.0, 5.0]))
    def check(T, U, seed, window, scale):
        x, y, _, _ = random_batch(1, T, U, 6, seed=seed, scale=scale, mixed=False,
                                  dtype=torch.float64)
        (al,) = align(x, y, torch.tensor([T]), torch.tensor([U]), blank=0, backend=backend)
        post = reference_posteriors(x[0], y[0])
        times = utterance_times(al, y[0].numpy(), None, frame_shift=0.04, grouping="token",
                                window=window)
        for u, tok in enumerate(times.tokens):
            f = tok.start_frame
            assert 0.0 <= tok.frame_posterior <= 1.0 and 0.0 <= tok.window_posterior <= 1.0
            assert tok.frame_posterior == pytest.approx(post[f, u], abs=1e-9)
            want = post[max(0, f - window): f + window + 1, u].sum()
            assert tok.window_posterior == pytest.approx(min(want, 1.0), abs=1e-9)
            assert tok.expected_frame == pytest.approx((np.arange(T) * post[:, u]).sum(),
                                                       abs=1e-8)
        # Word confidence: the aggregate of its tokens' (min by default).
        w = utterance_times(al, y[0].numpy(), ["\u2581a"] + ["b"] * (U - 1),
                            frame_shift=0.04, grouping="marker", window=window)
        (word,) = w.words
        assert word.confidence == min(t.window_posterior for t in times.tokens)
        assert word.frame_confidence == min(t.frame_posterior for t in times.tokens)

    check()


@pytest.mark.parametrize("how", ["min", "mean", "prod", "max"])
def test_word_confidence_aggregates(how):
    x, y, _, _ = random_batch(1, 7, 3, 6, seed=2, mixed=False, dtype=torch.float64)
    (al,) = align(x, y, torch.tensor([7]), torch.tensor([3]), blank=0)
    names = ["\u2581a", "b", "c"]
    t = utterance_times(al, y[0].numpy(), names, frame_shift=0.04, aggregate=how)
    p = [tok.window_posterior for tok in t.tokens]
    want = {"min": min(p), "max": max(p), "mean": sum(p) / 3, "prod": p[0] * p[1] * p[2]}[how]
    assert t.words[0].confidence == pytest.approx(want, rel=1e-12)
    assert 0.0 <= t.words[0].confidence <= 1.0


# --------------------------------------------------------------------------- words
def test_word_grouping_on_the_marker():
    toks = ["\u2581the", "\u2581c", "at", "s", "\u2581", "sat", "\u2581"]
    assert word_groups(toks, "marker") == [("the", [0]), ("cats", [1, 2, 3]), ("sat", [4, 5])]
    # Tokens before the first marker form a word of their own.
    assert word_groups(["ab", "c", "\u2581d"], "marker") == [("abc", [0, 1]), ("d", [2])]
    assert grouping_for(VOCAB) == "marker"
    assert grouping_for(["<b>", "a", "b"]) == "token" and grouping_for(None) == "token"


def test_word_grouping_on_a_separator_and_per_token():
    toks = ["|", "t", "h", "e", "|", "|", "c", "a", "t", "|"]
    assert word_groups(toks, "separator", "|") == [("the", [1, 2, 3]), ("cat", [6, 7, 8])]
    assert word_groups(toks[:4], "token") == [("|", [0]), ("t", [1]), ("h", [2]), ("e", [3])]
    assert grouping_for(VOCAB, "word", "|") == "separator"
    assert grouping_for(VOCAB, "token") == "token"
    with pytest.raises(ValueError, match="not a token of the vocab"):
        grouping_for(VOCAB, "word", "#")
    with pytest.raises(ValueError, match="does not go with"):
        grouping_for(VOCAB, "token", "|")
    assert grouping_for(None, "word", "7") == "separator"  # no vocab: ids


@given(st.lists(st.sampled_from(VOCAB[1:7]), max_size=12))
def test_marker_words_partition_the_tokens_and_spell_the_text(toks):
    groups = word_groups(toks, "marker")
    positions = [p for _, ps in groups for p in ps]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    # Every token outside a word carries nothing but markers.
    assert all(toks[p].replace("\u2581", "") == "" for p in set(range(len(toks))) - set(positions))
    text = "".join(toks).replace("\u2581", " ").split()
    assert [w for w, _ in groups] == text


def test_cli_word_sep_and_fallback(tmp_path):
    vocab = ["<b>", "|", "c", "a", "t"]
    x = placed_logits(10, [2, 3, 4, 1, 3], [1, 1, 2, 4, 8], 5)
    full, _ = write_pair(tmp_path, {"u": (x, [2, 3, 4, 1, 3], None)}, vocab=vocab)
    rows = rows_of(invoke("timestamps", full, "--word-sep", "|", "-f", "tsv").stdout)
    assert [(r["word"], r["start_frame"], r["end_frame"]) for r in rows] == [
        ("cat", "1", "3"), ("a", "8", "9")]
    # No ▁ in the vocab and no --word-sep: one word per token, with a note.
    got = invoke("timestamps", full, "-f", "tsv")
    assert got.exit_code == 0 and "one word per token" in got.stderr
    assert [r["word"] for r in rows_of(got.stdout)] == ["c", "a", "t", "|", "a"]
    one_line_error(invoke("timestamps", full, "--word-sep", "#"), "--word-sep", "'#'")
    one_line_error(invoke("timestamps", full, "--word-sep", "|", "--unit", "token"),
                   "does not go with --unit token")


# --------------------------------------------------------------------------- formats
def test_ctm_lines_parse_as_sctk_ctm(tmp_path):
    full, lattice = sentence_dump(tmp_path)
    for path in (full, lattice):
        got = invoke("timestamps", path, "-f", "ctm", "--window", "1")
        assert got.exit_code == 0, got.output
        lines = got.stdout.splitlines()
        fields = [line.split() for line in lines]
        assert all(len(f) in (5, 6) for f in fields)
        assert all(f[1] == "1" for f in fields)
        keys = [(f[0], float(f[2])) for f in fields]
        assert keys == sorted(keys)  # by utterance, then start
        assert [(f[0], f[4]) for f in fields] == [("u1", "the"), ("u1", "cats"), ("u1", "sat"),
                                                  ("u2", "the")]
        assert [float(f[2]) for f in fields] == [0.08, 0.2, 0.44, 0.12]
        assert [float(f[3]) for f in fields] == [0.04, 0.08, 0.04, 0.04]
        assert all(0.0 <= float(f[5]) <= 1.0 for f in fields)
        # read back by rnntool's own CTM reader
        (tmp_path / "x.ctm").write_text(got.stdout)
        back = read_ctm(tmp_path / "x.ctm")
        assert [w.word for w in back["u1"]] == ["the", "cats", "sat"]
    got = invoke("timestamps", full, "-f", "ctm", "--channel", "A", "--unit", "token")
    assert [line.split()[1] for line in got.stdout.splitlines()] == ["A"] * 6
    one_line_error(invoke("timestamps", full, "-f", "ctm", "--channel", "a b"), "--channel")


def test_ctm_is_sorted_across_utterances_and_inputs(tmp_path):
    a, _ = sentence_dump(tmp_path, name="a")
    got = invoke("timestamps", a, "-f", "ctm", "--utt", "u2", "--utt", "u1")
    assert [line.split()[0] for line in got.stdout.splitlines()] == ["u1"] * 3 + ["u2"]


def test_lhotse_output_loads_with_lhotse(tmp_path):
    lhotse = pytest.importorskip("lhotse")
    full, lattice = sentence_dump(tmp_path)
    got = invoke("timestamps", full, "-f", "lhotse", "-q")
    assert got.exit_code == 0, got.output
    sups = [lhotse.SupervisionSegment.from_dict(json.loads(line))
            for line in got.stdout.splitlines()]
    assert [s.id for s in sups] == ["u1", "u2"]
    s = sups[0]
    assert s.recording_id == "u1" and s.start == 0.0 and s.duration == pytest.approx(14 * 0.04)
    assert s.text == "the cats sat" and sups[1].text == "the"
    words = s.alignment["word"]
    assert [w.symbol for w in words] == ["the", "cats", "sat"]
    assert [w.start for w in words] == [2 * 0.04, 5 * 0.04, 11 * 0.04]
    assert [w.duration for w in words] == pytest.approx([0.04, 0.08, 0.04])
    assert all(0.0 <= w.score <= 1.0 for w in words)
    assert [t.symbol for t in s.alignment["token"]] == ["\u2581the", "\u2581c", "at", "s",
                                                        "\u2581sat"]
    # The lattice dump gives the same supervisions.
    assert invoke("timestamps", lattice, "-f", "lhotse", "-q").stdout == got.stdout


def test_textgrid_files_parse_with_praatio(tmp_path):
    tg = pytest.importorskip("praatio.textgrid")
    full, _ = sentence_dump(tmp_path)
    out = tmp_path / "grids"
    got = invoke("timestamps", full, "-f", "textgrid", "--out-dir", out, "-q")
    assert got.exit_code == 0, got.output
    assert sorted(p.name for p in out.iterdir()) == ["u1.TextGrid", "u2.TextGrid"]
    grid = tg.openTextgrid(str(out / "u1.TextGrid"), includeEmptyIntervals=False)
    assert grid.tierNames == ("words", "tokens") or list(grid.tierNames) == ["words", "tokens"]
    assert grid.maxTimestamp == pytest.approx(14 * 0.04)
    words = grid.getTier("words").entries
    assert [e.label for e in words] == ["the", "cats", "sat"]
    assert [x for e in words for x in (e.start, e.end)] == pytest.approx(
        [0.08, 0.12, 0.2, 0.28, 0.44, 0.48])
    tokens = grid.getTier("tokens").entries
    assert [e.label for e in tokens] == ["\u2581the", "\u2581c", "at", "s", "\u2581sat"]
    # ▁c and at share frame 5: the TextGrid splits it evenly between them, in order.
    assert [x for e in tokens[1:3] for x in (e.start, e.end)] == pytest.approx(
        [0.2, 0.22, 0.22, 0.24])
    one_line_error(invoke("timestamps", full, "-f", "textgrid"), "--out-dir")
    one_line_error(invoke("timestamps", full, "--out-dir", out), "--format textgrid")


def test_tsv_has_every_field_and_a_file_column_for_several_inputs(tmp_path):
    a, _ = sentence_dump(tmp_path, name="a")
    b, _ = sentence_dump(tmp_path, name="b")
    rows = rows_of(invoke("timestamps", a, b, "-f", "tsv", "-q").stdout)
    assert list(rows[0]) == ["file", "utt_id", "word_index", "word", "start", "end", "duration",
                             "start_frame", "end_frame", "expected_start", "expected_end",
                             "confidence", "frame_confidence", "first_token", "n_tokens",
                             "tokens"]
    assert [r["file"] for r in rows] == [str(a)] * 4 + [str(b)] * 4
    assert rows[1]["tokens"] == "\u2581c at s" and rows[1]["n_tokens"] == "3"


# --------------------------------------------------------------------------- --ref
def write_ctm(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_ref_reports_offsets_and_summary(tmp_path):
    full, lattice = sentence_dump(tmp_path)
    # Reference words 30 ms before each word's start and 10 ms after its end.
    ref = write_ctm(tmp_path / "ref.ctm", [
        ";; a comment", "u1 1 0.05 0.08 the", "u1 1 0.17 0.12 CATS 0.9", "",
        "u1 1 0.41 0.08 sat", "u2 1 0.09 0.08 the"])
    summary = tmp_path / "s.json"
    got = invoke("timestamps", full, "--ref", ref, "--summary", summary, "-f", "jsonl")
    assert got.exit_code == 0, got.output
    rows = [json.loads(line) for line in got.stdout.splitlines()]
    for r in rows:
        assert r["start_offset_ms"] == pytest.approx(30.0)
        assert r["end_offset_ms"] == pytest.approx(-10.0)
        assert r["expected_start_offset_ms"] == pytest.approx(30.0, abs=1e-3)
    assert rows[1]["ref_word"] == "CATS"  # compared ignoring case
    s = json.loads(summary.read_text())
    assert s["count"] == 4
    for k in ("mean", "median", "p90", "min", "max"):
        assert s["start_offset_ms"][k] == pytest.approx(30.0)
        assert s["end_offset_ms"][k] == pytest.approx(-10.0)
        assert s["expected_start_offset_ms"][k] == pytest.approx(30.0, abs=1e-3)
    assert "start offset: mean 30.0, median 30.0, p90 30.0" in got.stderr
    # The lattice dump: the same report.
    again = invoke("timestamps", lattice, "--ref", ref, "--summary", tmp_path / "t.json",
                   "-f", "jsonl", "-q")
    assert again.stdout == got.stdout and again.stderr == ""
    assert json.loads((tmp_path / "t.json").read_text()) == s


def test_delay_summary_statistics():
    rows = [{k: v for k in ("start_offset_ms", "end_offset_ms", "expected_start_offset_ms",
                            "expected_end_offset_ms")} for v in (10.0, -20.0, 40.0, 0.0, 100.0)]
    s = delay_summary(rows)["start_offset_ms"]
    assert s == {"mean": 26.0, "median": 10.0, "p90": pytest.approx(76.0), "min": -20.0,
                 "max": 100.0}
    assert delay_summary([])["start_offset_ms"] is None


def test_ref_with_other_words_exits_2_naming_the_utterance(tmp_path):
    full, _ = sentence_dump(tmp_path)
    ref = write_ctm(tmp_path / "ref.ctm", ["u1 1 0.05 0.08 the", "u1 1 0.17 0.12 dogs",
                                           "u1 1 0.41 0.08 sat", "u2 1 0.09 0.08 the"])
    out = tmp_path / "out.tsv"
    line = one_line_error(invoke("timestamps", full, "--ref", ref, "-o", out),
                          "utterance u1", "'cats'", "'dogs'", str(ref))
    assert "word 2" in line and not out.exists()
    short = write_ctm(tmp_path / "short.ctm", ["u1 1 0.05 0.08 the", "u1 1 0.17 0.12 cats",
                                               "u2 1 0.09 0.06 the"])
    one_line_error(invoke("timestamps", full, "--ref", short), "utterance u1",
                   "3 words aligned but 2")
    missing = write_ctm(tmp_path / "missing.ctm", ["u1 1 0.05 0.08 the", "u1 1 0.17 0.12 cats",
                                                   "u1 1 0.41 0.08 sat"])
    one_line_error(invoke("timestamps", full, "--ref", missing), "utterance u2",
                   "no reference words")
    with pytest.raises(WordMismatch):
        check_words("x", ["a"], [], "r.ctm")


@pytest.mark.parametrize("line, needle", [
    ("u1 1 0.05 the", "has 4 fields"),
    ("u1 1 0.05 0.08 the 0.9 extra", "has 7 fields"),
    ("u1 1 abc 0.08 the", "start 'abc'"),
    ("u1 1 0.05 nan the", "duration 'nan'"),
    ("u1 1 -0.05 0.08 the", "start '-0.05'"),
    ("u1 1 0.05 0.08 the high", "confidence 'high'"),
    ("u1 1 inf 0.08 the", "start 'inf'"),
])
def test_bad_ctm_lines_are_one_line_naming_file_and_line(tmp_path, line, needle):
    full, _ = sentence_dump(tmp_path)
    ref = write_ctm(tmp_path / "bad.ctm", ["u2 1 0.09 0.06 the", line])
    one_line_error(invoke("timestamps", full, "--ref", ref), str(ref), "line 2", needle)
    with pytest.raises(CtmError, match="line 2"):
        read_ctm(ref)


def test_bad_ctm_bytes(tmp_path):
    full, _ = sentence_dump(tmp_path)
    ref = tmp_path / "bin.ctm"
    ref.write_bytes(b"u2 1 0.09 0.06 the\nu1 1 0.0 0.1 \xff\xfe\n")
    one_line_error(invoke("timestamps", full, "--ref", ref), "line 2 is not UTF-8")
    ref.write_bytes(b"u1 " + b"x" * 70000 + b"\n")
    one_line_error(invoke("timestamps", full, "--ref", ref), "line 1 is longer than 64 KiB")
    one_line_error(invoke("timestamps", full, "--ref", tmp_path / "none.ctm"),
                   "none.ctm", "cannot read")
    one_line_error(invoke("timestamps", full, "--summary", tmp_path / "s.json"), "--ref")


# --------------------------------------------------------------------------- frame shift
def test_no_frame_shift_is_one_line_and_the_flag_overrides(tmp_path):
    x = placed_logits(8, [1, 4], [2, 6], len(VOCAB))
    path = tmp_path / "plain.h5"
    with DumpWriter(path, vocab=VOCAB) as w:
        w.add("u", x, np.array([1, 4]))
    with DumpReader(path) as r:
        assert r.frame_shift is None
    one_line_error(invoke("timestamps", path), str(path), "no frame shift", "--frame-shift")
    rows = rows_of(invoke("timestamps", path, "--frame-shift", "0.08", "-f", "tsv").stdout)
    assert [float(r["start"]) for r in rows] == [0.16, 0.48]
    # The flag overrides the dump's.
    full, _ = sentence_dump(tmp_path, frame_shift=0.04)
    rows = rows_of(invoke("timestamps", full, "--frame-shift", "0.01", "-f", "tsv").stdout)
    assert float(rows[0]["start"]) == 2 * 0.01
    for bad in ("0", "-0.04", "nan", "inf"):
        one_line_error(invoke("timestamps", full, "--frame-shift", bad), "--frame-shift")


@pytest.mark.parametrize("kind", ["full", "lattice"])
def test_dump_writer_frame_shift_round_trips(tmp_path, kind):
    x, y, T, U = random_batch(2, 5, 2, 5, seed=1)
    path = tmp_path / "d.h5"
    with DumpWriter(path, kind=kind, frame_shift=np.float32(0.04)) as w:
        w.add_batch(x, y, T, U)
    with h5py.File(path) as f:
        assert f.attrs["frame_shift"] == np.float64(np.float32(0.04))
    with DumpReader(path) as r:
        assert r.frame_shift == float(np.float32(0.04))
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="frame_shift"):
            DumpWriter(tmp_path / "e.h5", kind=kind, frame_shift=bad)
    for bad in ("0.04", True, [0.04, 0.08]):
        with pytest.raises(TypeError, match="frame_shift"):
            DumpWriter(tmp_path / "e.h5", kind=kind, frame_shift=bad)
    assert not (tmp_path / "e.h5").exists()


@pytest.mark.parametrize("value, needle", [
    ("0.04", "is not a number"), (np.array([0.04, 0.08]), "is not a number"),
    (0.0, "not a finite number of seconds > 0"), (-0.04, "> 0"), (np.nan, "> 0"),
    (np.inf, "> 0"), (True, "is not a number"),
])
def test_a_bad_stored_frame_shift_is_one_line_naming_the_file(tmp_path, value, needle):
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"u": {"blank_lp": np.zeros((3, 1), np.float32),
                                   "emit_lp": np.zeros((3, 0), np.float32),
                                   "log_p2_others": np.full((3, 1), -np.inf, np.float32),
                                   "labels": np.zeros(0, np.int64)}}, frame_shift=value)
    with DumpReader(path) as r, pytest.raises(DumpError, match=str(path)) as e:
        _ = r.frame_shift
    assert needle in str(e.value) and "frame_shift" in str(e.value)
    one_line_error(invoke("timestamps", path), str(path), "frame_shift")
    # Commands that need no seconds do not read it; inspect reports it as a problem.
    assert invoke("score", path, "-q").exit_code == 0
    got = invoke("inspect", path, "-f", "json")
    assert got.exit_code == 1 and "frame_shift" in got.stderr
    assert json.loads(got.stdout)[0]["frame_shift"] is None


def test_compact_carries_the_frame_shift_and_inspect_shows_it(tmp_path):
    full, _ = sentence_dump(tmp_path, frame_shift=0.06)
    out = tmp_path / "c.h5"
    assert invoke("compact", full, "-o", out, "-q").exit_code == 0
    with DumpReader(out) as r:
        assert r.frame_shift == 0.06
    rows = rows_of(invoke("inspect", full, out, "-f", "tsv").stdout)
    assert [r["frame_shift"] for r in rows] == ["0.060000", "0.060000"]
    fields = list(rows[0])
    assert fields[fields.index("input_kind") + 1] == "frame_shift"
    plain = tmp_path / "p.h5"
    with DumpWriter(plain) as w:
        w.add("u", np.zeros((2, 1, 3), np.float32), np.zeros(0, np.int64))
    assert rows_of(invoke("inspect", plain, "-f", "tsv").stdout)[0]["frame_shift"] == ""
    assert invoke("compact", plain, "-o", tmp_path / "pc.h5", "-q").exit_code == 0
    with DumpReader(tmp_path / "pc.h5") as r:
        assert r.frame_shift is None


# --------------------------------------------------------------------------- problems
def test_a_non_finite_utterance_gets_no_times_and_exit_1(tmp_path):
    x = placed_logits(6, [1], [2], len(VOCAB))
    bad = x.copy()
    bad[-1, -1, 0], bad[-1, -1, 2] = -np.inf, 0.0  # no final blank: loss +inf
    full, _ = write_pair(tmp_path, {"good": (x, [1], None), "bad": (bad, [1], None)})
    got = invoke("timestamps", full, "-f", "tsv")
    assert got.exit_code == 1
    assert [r["utt_id"] for r in rows_of(got.stdout)] == ["good"]
    assert "utterance bad" in got.stderr


def test_unknown_format_and_options(tmp_path):
    full, _ = sentence_dump(tmp_path)
    one_line_error(invoke("timestamps", full, "-f", "srt"), "--format 'srt'")
    one_line_error(invoke("timestamps", full, "--unit", "phone"), "--unit 'phone'")
    one_line_error(invoke("timestamps", full, "--aggregate", "median"), "--aggregate")
    one_line_error(invoke("timestamps", full, "--window", "-1"), "--window -1")


def test_selection_and_output_file(tmp_path):
    full, _ = sentence_dump(tmp_path)
    ids = tmp_path / "ids.txt"
    ids.write_text("u2\n")
    out = tmp_path / "t.ctm"
    got = invoke("timestamps", full, "--utt-list", ids, "-f", "ctm", "-o", out, "-q")
    assert got.exit_code == 0 and got.stdout == "" and got.stderr == ""
    assert out.read_text() == "u2 1 0.120 0.040 the 1.0000\n"
    one_line_error(invoke("timestamps", full, "--utt", "nope"), "no utterance 'nope'")


def test_padded_dump_without_vocab_groups_at_a_separator_id(tmp_path):
    labels = [2, 3, 1, 4]  # token 1 separates words: "2 3" and "4"
    x = placed_logits(9, labels, [1, 2, 4, 7], 5)[None]
    path = tmp_path / "padded.h5"
    write_padded_raw(path, x, np.array([labels]), np.array([9]), np.array([4]))
    rows = rows_of(invoke("timestamps", path, "--frame-shift", "0.05", "--word-sep", "1",
                          "-f", "tsv").stdout)
    assert [(r["word"], r["start"], r["end"]) for r in rows] == [
        ("23", "0.050000", "0.150000"), ("4", "0.350000", "0.400000")]
    one_line_error(invoke("timestamps", path, "--frame-shift", "0.05", "--word-sep", "x"),
                   "give the separator's id")


# --------------------------------------------------------------------------- hostile inputs, found by attack
def test_reference_times_outside_the_utterance_exit_2_before_anything_is_written(tmp_path):
    full, _ = sentence_dump(tmp_path)  # u1: 14 frames of 40 ms = 0.56 s; u2: 0.24 s
    out, summary = tmp_path / "out.tsv", tmp_path / "s.json"
    words = [("u1", "the"), ("u1", "cats"), ("u1", "sat"), ("u2", "the")]
    # Huge but finite times: the offsets would be -inf and the summary -Infinity (not JSON).
    huge = write_ctm(tmp_path / "huge.ctm", [f"{u} 1 {1e306 * (i + 1)} 1 {w}"
                                            for i, (u, w) in enumerate(words)])
    # A recording's CTM: times relative to the recording, 100 s into it.
    rec = write_ctm(tmp_path / "rec.ctm", [f"{u} 1 {100 + 0.1 * i} 0.08 {w}"
                                           for i, (u, w) in enumerate(words)])
    for ref in (huge, rec):
        one_line_error(invoke("timestamps", full, "--ref", ref, "--summary", summary, "-o", out),
                       str(ref), "utterance u1", "'the'", "after the utterance's 0.56 s")
        assert not out.exists() and not summary.exists()
    # A start and duration whose sum overflows: the reader refuses the line.
    over = write_ctm(tmp_path / "over.ctm", ["u2 1 1e308 1e308 the"])
    one_line_error(invoke("timestamps", full, "--ref", over), str(over), "line 1",
                   "not a finite number")
    # A word ending up to REF_SLACK after the last frame is fine (subsampling drops frames).
    ok = write_ctm(tmp_path / "ok.ctm", ["u1 1 0.05 0.08 the", "u1 1 0.17 0.12 cats",
                                         "u1 1 0.41 1.1 sat", "u2 1 0.09 0.08 the"])
    got = invoke("timestamps", full, "--ref", ok, "--summary", summary, "-q")
    assert got.exit_code == 0, got.output
    s = json.loads(summary.read_text())  # strict JSON: no Infinity/NaN
    assert s["end_offset_ms"]["min"] == pytest.approx(1000 * (0.48 - 1.51))


@pytest.mark.parametrize("number", ["1_0", "\u0663", "0x10", "infinity", "1e", "."])
def test_ctm_numbers_are_ascii_decimals(tmp_path, number):
    ref = write_ctm(tmp_path / "r.ctm", [f"u2 1 {number} 0.04 the"])
    with pytest.raises(CtmError, match="line 1: start"):
        read_ctm(ref)


def test_ctm_from_windows_tools_bom_and_crlf(tmp_path):
    full, _ = sentence_dump(tmp_path)
    lines = ["u1 1 0.05 0.08 the", "u1 1 0.17 0.12 cats", "u1 1 0.41 0.08 sat",
             "u2 1 0.09 0.08 the"]
    plain = write_ctm(tmp_path / "plain.ctm", lines)
    win = tmp_path / "win.ctm"
    win.write_bytes(b"\xef\xbb\xbf" + "".join(line + "\r\n" for line in lines).encode())
    assert read_ctm(win) == read_ctm(plain)
    a = invoke("timestamps", full, "--ref", plain, "-f", "tsv", "-q")
    b = invoke("timestamps", full, "--ref", win, "-f", "tsv", "-q")
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout


def test_reference_words_compare_under_unicode_normal_forms_and_case():
    ref = [CtmWord("CAFE\u0301", 0.0, 0.1, 1), CtmWord("\ufb01ne", 0.1, 0.1, 2)]
    check_words("u", ["caf\u00e9", "FINE"], ref, "r.ctm")  # NFD vs NFC, a ligature, case
    with pytest.raises(WordMismatch, match="word 1"):
        check_words("u", ["cafe", "fine"], ref, "r.ctm")


@pytest.mark.parametrize("bad", ["1e300", "1e-320", "61", "1e-7"])
def test_frame_shift_outside_a_microsecond_to_a_minute_is_refused(tmp_path, bad):
    full, _ = sentence_dump(tmp_path)
    one_line_error(invoke("timestamps", full, "--frame-shift", bad, "-f", "ctm"),
                   "--frame-shift", "plausible frame shift")
    # The dump's own: named with the file; --frame-shift overrides it.
    path = tmp_path / "big.h5"
    x = placed_logits(6, [1], [3], len(VOCAB))
    write_keyed_raw(path, {"u": (x, np.array([1]))}, frame_shift=float(bad),
                    vocab=np.array(VOCAB, dtype=h5py.string_dtype()))
    one_line_error(invoke("timestamps", path, "-f", "ctm"), str(path), "attribute frame_shift",
                   "--frame-shift")
    assert invoke("timestamps", path, "--frame-shift", "0.04", "-f", "ctm").exit_code == 0
    (al,) = align(torch.from_numpy(x)[None], torch.tensor([[1]]), torch.tensor([6]),
                  torch.tensor([1]), blank=0)
    with pytest.raises(ValueError, match="plausible"):
        utterance_times(al, np.array([1]), None, frame_shift=float(bad))
    assert utterance_times(al, np.array([1]), None, frame_shift=1e-6).tokens[0].end == 4e-6


@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_ctm_start_plus_duration_is_the_rounded_end_and_never_overlaps(data):
    """Start and duration rounded each on its own make start + duration overshoot the
    next word's start (frame shift 12.5 ms: 0.013 + 0.013 > 0.025)."""
    from decimal import Decimal

    T = data.draw(st.integers(1, 40))
    U = data.draw(st.integers(1, 8))
    frames = sorted(data.draw(st.lists(st.integers(0, T - 1), min_size=U, max_size=U)))
    shift = data.draw(st.sampled_from([0.0125, 1 / 75, 0.0333, 0.0005, 0.00025, 0.04]))
    x = torch.from_numpy(placed_logits(T, [1] * U, frames, 3))[None]
    (al,) = align(x, torch.tensor([[1] * U]), torch.tensor([T]), torch.tensor([U]), blank=0)
    times = utterance_times(al, np.ones(U, np.int64), None, frame_shift=shift,
                            grouping="token", utt_id="u")
    lines = [line.split() for line in ctm_lines(times, "token")]
    d = max(3, math.ceil(-math.log10(shift) - 1e-9))
    q = Decimal(1).scaleb(-d)
    for tok, f in zip(times.tokens, lines, strict=True):
        start, dur = Decimal(f[2]), Decimal(f[3])
        assert start == Decimal(round(tok.start * 10**d)) * q
        assert start + dur == Decimal(round(tok.end * 10**d)) * q
        assert dur > 0
    for i in range(len(lines) - 1):
        if times.tokens[i].end <= times.tokens[i + 1].start:
            assert Decimal(lines[i][2]) + Decimal(lines[i][3]) <= Decimal(lines[i + 1][2])


def test_ctm_and_lhotse_refuse_an_id_in_two_inputs(tmp_path):
    a, _ = sentence_dump(tmp_path, name="a")
    b, _ = sentence_dump(tmp_path, name="b")
    out = tmp_path / "o.ctm"
    for fmt, needle in (("ctm", "a CTM line names no file"), ("lhotse", "ids are unique")):
        one_line_error(invoke("timestamps", a, b, "-f", fmt, "-o", out), "utterance 'u1'",
                       str(a), str(b), needle)
        assert not out.exists()
    # Disjoint selections, or a format with a file column, are fine.
    assert invoke("timestamps", a, b, "-f", "tsv", "-q").exit_code == 0


def test_ctm_fields_are_checked_before_any_work_naming_the_file(tmp_path):
    x = placed_logits(6, [1], [3], len(VOCAB))
    path = tmp_path / "ids.h5"
    write_padded_raw(path, np.stack([x, x]), np.ones((2, 1), np.int64), np.array([6, 6]),
                     np.array([1, 1]), frame_shift=0.04)
    with h5py.File(path, "a") as f:
        f["utt_ids"] = np.array([b"fine", b"a b"], dtype=h5py.string_dtype())
        f["vocab"] = np.array(VOCAB, dtype=h5py.string_dtype())
    out = tmp_path / "o.ctm"
    one_line_error(invoke("timestamps", path, "-f", "ctm", "-o", out), str(path),
                   "utterance a b", "'a b'", "CTM field")
    assert not out.exists()
    vocab = ["<b>", "\u2581new york", "\u2581x"]
    full, _ = write_pair(tmp_path, {"u": (placed_logits(5, [2, 1], [1, 3], 3), [2, 1], None)},
                         vocab=vocab, name="v")
    got = invoke("timestamps", full, "-f", "ctm")
    one_line_error(got, str(full), "utterance u", "'new york'")
    assert got.stdout == ""
    assert invoke("timestamps", full, "-f", "tsv", "-q").exit_code == 0  # TSV can hold it


@pytest.mark.parametrize("sep, needle", [
    ("01", "plain decimal number"), ("\u0661", "plain decimal number"),
    ("9", "no token id 9 (ids are 0 to 4)"), ("0", "is the blank"),
])
def test_a_word_separator_no_label_can_hold_is_refused(tmp_path, sep, needle):
    labels = [2, 3, 1, 4]
    x = placed_logits(9, labels, [1, 2, 4, 7], 5)[None]
    path = tmp_path / "padded.h5"
    write_padded_raw(path, x, np.array([labels]), np.array([9]), np.array([4]))
    one_line_error(invoke("timestamps", path, "--frame-shift", "0.05", "--word-sep", sep),
                   str(path), "--word-sep", needle)


def test_the_blank_by_name_is_no_word_separator(tmp_path):
    full, _ = sentence_dump(tmp_path)
    one_line_error(invoke("timestamps", full, "--word-sep", "<b>"), "'<b>' is the blank")
    with pytest.raises(ValueError, match="is the blank"):
        grouping_for(VOCAB, "word", "<b>", blank=-8, vocab_size=8)
    with pytest.raises(ValueError, match="needs word_sep"):
        word_groups(["a", "|", "b"], "separator")


def test_summary_that_cannot_be_written_leaves_no_times(tmp_path):
    full, _ = sentence_dump(tmp_path)
    ref = write_ctm(tmp_path / "ref.ctm", ["u1 1 0.05 0.08 the", "u1 1 0.17 0.12 cats",
                                           "u1 1 0.41 0.08 sat", "u2 1 0.09 0.08 the"])
    out = tmp_path / "out.ctm"
    # A directory where no file can be made (passes the early checks: it exists).
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, so blocked/s.json cannot be created")
    got = invoke("timestamps", full, "--ref", ref, "--summary", blocked / "s.json", "-f", "ctm",
                 "-o", out)
    assert got.exit_code == 2 and "s.json" in got.stderr
    assert not out.exists()
    # The summary and -o naming one file through a symbolic or a hard link.
    out.write_text("old\n")
    (tmp_path / "sym.json").symlink_to(out)
    os.link(out, tmp_path / "hard.json")
    for alias in ("sym.json", "hard.json"):
        one_line_error(invoke("timestamps", full, "--ref", ref, "--summary", tmp_path / alias,
                              "-f", "ctm", "-o", out), "both -o and --summary")
    assert out.read_text() == "old\n"


def test_api_refuses_mismatched_lengths_and_unknown_units(tmp_path):
    x = placed_logits(6, [1, 4], [1, 3], len(VOCAB))
    (al,) = align(torch.from_numpy(x)[None], torch.tensor([[1, 4]]), torch.tensor([6]),
                  torch.tensor([2]), blank=0)
    with pytest.raises(ValueError, match="labels of shape"):
        utterance_times(al, np.array([1]), None, frame_shift=0.04)
    with pytest.raises(ValueError, match="3 token names"):
        utterance_times(al, np.array([1, 4]), ["a", "b", "c"], frame_shift=0.04)
    with pytest.raises(ValueError, match="needs word_sep"):
        utterance_times(al, np.array([1, 4]), ["a", "b"], frame_shift=0.04,
                        grouping="separator")
    times = utterance_times(al, np.array([1, 4]), ["\u2581the", "\u2581sat"], frame_shift=0.04)
    for fn in (lambda: units_of(times, "tokens"), lambda: ctm_lines(times, "words"),
               lambda: lhotse_supervision(times, "tokens"),
               lambda: delay_rows(times, [], "r.ctm", "tokens")):
        with pytest.raises(ValueError, match="unit must be one of"):
            fn()


def test_textgrid_words_stay_in_their_frames_when_they_share_one(tmp_path):
    """A word whose first token is emitted in the frame of the previous word's last token
    used to be drawn half-way across both words (here: "sat" from frame 4, 40 ms before
    its emission at frame 5)."""
    tg = pytest.importorskip("praatio.textgrid")
    labels = [2, 3, 6, 3, 4]  # ▁c at s at | ▁sat: "catsat" at frames 2..5, "sat" at 5
    full, _ = write_pair(tmp_path, {"w": (placed_logits(8, labels, [2, 3, 4, 5, 5], len(VOCAB)),
                                          labels, None)})
    out = tmp_path / "grids"
    assert invoke("timestamps", full, "-f", "textgrid", "-d", out, "-q").exit_code == 0
    grid = tg.openTextgrid(str(out / "w.TextGrid"), includeEmptyIntervals=False)
    words = [(e.start / 0.04, e.end / 0.04, e.label) for e in grid.getTier("words").entries]
    tokens = [(e.start / 0.04, e.end / 0.04, e.label) for e in grid.getTier("tokens").entries]
    assert [w[2] for w in words] == ["catsat", "sat"]
    assert [x for w in words for x in w[:2]] == pytest.approx([2.0, 5.5, 5.5, 6.0])
    assert [t[2] for t in tokens[-2:]] == ["at", "\u2581sat"]
    assert [x for t in tokens[-2:] for x in t[:2]] == pytest.approx([5.0, 5.5, 5.5, 6.0])


@settings(deadline=None, max_examples=40)
@given(data=st.data())
def test_textgrid_intervals_are_frame_shares_of_the_true_times(data):
    from rnntool.timestamps import frame_shares, textgrid

    T = data.draw(st.integers(1, 10))
    names = ["<b>", "\u2581a", "b"]
    labels = data.draw(st.lists(st.integers(1, 2), min_size=1, max_size=7))
    U = len(labels)
    frames = sorted(data.draw(st.lists(st.integers(0, T - 1), min_size=U, max_size=U)))
    x = torch.from_numpy(placed_logits(T, labels, frames, 3))[None]
    (al,) = align(x, torch.tensor([labels]), torch.tensor([T]), torch.tensor([U]), blank=0)
    times = utterance_times(al, np.array(labels), [names[y] for y in labels],
                            frame_shift=0.04)
    shares = frame_shares(times)
    for (a, b), tok in zip(shares, times.tokens, strict=True):
        assert tok.start <= a < b <= tok.end  # inside its own frame
    assert all(shares[i][1] <= shares[i + 1][0] for i in range(U - 1))  # no overlap
    for w in times.words:  # a word is drawn inside its true span, from its own frames
        a, b = shares[w.positions[0]][0], shares[w.positions[-1]][1]
        assert w.start <= a < w.start + 0.04 and w.end - 0.04 < b <= w.end
    for tier in textgrid(times).split("    item [")[1:]:
        xs = [float(v) for v in re.findall(r"^ {12}xm(?:in|ax) = (\S+)$", tier, re.M)]
        assert xs == sorted(xs)  # the intervals in order, touching, never overlapping
        assert xs[0] == 0.0 and xs[-1] == times.duration


def test_api_takes_an_utterance_id_and_refuses_other_types(tmp_path):
    from rnntool.timestamps import timestamps

    full, lattice = sentence_dump(tmp_path)
    for path in (full, lattice):
        with DumpReader(path) as r:
            t = timestamps(r, "u1")
            assert [(w.word, w.start_frame) for w in t.words] == [("the", 2), ("cats", 5),
                                                                  ("sat", 11)]
            with pytest.raises(TypeError, match="utt must be"):
                timestamps(r, None)
            with pytest.raises(DumpError, match="no utterance 'nope'"):
                timestamps(r, "nope")
            with pytest.raises(TypeError, match="reader must be a DumpReader"):
                timestamps(str(path), "u1")
    with pytest.raises(TypeError, match="alignment must be an Alignment"):
        utterance_times(None, np.array([1]), None, frame_shift=0.04)


@settings(deadline=None)
@given(st.lists(st.floats(-5000, 5000, allow_nan=False), min_size=1, max_size=40))
def test_delay_summary_against_the_statistics_module(values):
    """median and p90 against Python's own statistics (p90: the inclusive method, which
    is numpy's linear interpolation), not against numpy itself."""
    import statistics

    rows = [dict.fromkeys(("start_offset_ms", "end_offset_ms", "expected_start_offset_ms",
                           "expected_end_offset_ms"), v) for v in values]
    s = delay_summary(rows)
    assert s["count"] == len(values)
    got = s["start_offset_ms"]
    assert got["median"] == pytest.approx(statistics.median(values), abs=1e-9)
    p90 = statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 \
        else values[0]
    assert got["p90"] == pytest.approx(p90, abs=1e-9)
    assert got["mean"] == pytest.approx(statistics.fmean(values), abs=1e-9)
    assert (got["min"], got["max"]) == (min(values), max(values))


def test_summary_on_stderr_shows_no_negative_zero(tmp_path):
    from helpers import ROOT

    sample = ROOT / "sample_data" / "sample.h5"
    ctm = invoke("timestamps", sample, "--frame-shift", "0.04", "-f", "ctm", "-q").stdout
    ref = tmp_path / "self.ctm"
    ref.write_text(ctm)  # its own times: every offset 0, up to float noise (-2e-13 ms)
    got = invoke("timestamps", sample, "--frame-shift", "0.04", "--ref", ref, "-f", "tsv",
                 "--summary", tmp_path / "s.json")
    assert got.exit_code == 0
    assert json.loads((tmp_path / "s.json").read_text())["end_offset_ms"]["min"] < 0
    assert "end offset: mean 0.0, median 0.0, p90 0.0, min 0.0, max 0.0" in got.stderr


def test_lhotse_text_is_a_transcript_with_unit_token(tmp_path):
    full, _ = sentence_dump(tmp_path)
    x = placed_logits(9, [2, 3, 6, 4], [1, 2, 4, 7], len(VOCAB))  # ▁c at s ▁sat, no text
    plain, _ = write_pair(tmp_path, {"v": (x, [2, 3, 6, 4], None)}, name="p")
    for unit in ("word", "token"):
        got = invoke("timestamps", plain, "-f", "lhotse", "--unit", unit, "-q")
        (sup,) = [json.loads(line) for line in got.stdout.splitlines()]
        assert sup["text"] == "cats sat"
    # The dump's own text wins.
    got = invoke("timestamps", full, "-f", "lhotse", "--unit", "token", "-q", "--utt", "u1")
    assert json.loads(got.stdout)["text"] == "the cats sat"


def _tiers(grid: str) -> dict:
    """A TextGrid's tiers, ``name -> [(xmin, xmax, text)]`` of the non-empty intervals."""
    tiers = {}
    for tier in grid.split("    item [")[1:]:
        name = re.search(r'^ {8}name = "(.*)"$', tier, re.M).group(1)
        found = re.findall(r"^ {12}xmin = (\S+)\n {12}xmax = (\S+)\n {12}text = \"(.*)\"$",
                           tier, re.M)
        tiers[name] = [(float(a), float(b), t) for a, b, t in found if t]
    return tiers


def test_textgrid_draws_tdt_tokens_over_their_durations_as_the_other_formats(tmp_path):
    """A TDT token lasts max(d, 1) frames in TSV and CTM; the TextGrid used to draw every
    token one frame wide (sample-tdt utt004's "j": TSV 0.00-0.12 s, TextGrid 0.00-0.04)."""
    from helpers import ROOT

    dump = ROOT / "sample_data" / "sample-tdt.h5"
    out = tmp_path / "grids"
    r = invoke("timestamps", dump, "--frame-shift", "0.04", "-f", "textgrid", "-d", out, "-q")
    assert r.exit_code in (0, 1), r.stderr
    def rows_of_unit(unit):
        return [json.loads(line) for line in invoke(
            "timestamps", dump, "--frame-shift", "0.04", "-f", "jsonl", "--unit", unit,
            "-q").stdout.splitlines()]

    token_rows = rows_of_unit("token")
    in_frame: dict = {}  # (utt_id, frame) -> how many tokens are emitted there
    for row in token_rows:
        key = (row["utt_id"], row["start_frame"])
        in_frame[key] = in_frame.get(key, 0) + 1
    for unit, tier, rows in (("token", "tokens", token_rows),
                             ("word", "words", rows_of_unit("word"))):
        longer = 0
        for utt_id in sorted({r["utt_id"] for r in rows}):
            got = _tiers((out / f"{utt_id}.TextGrid").read_text(encoding="utf-8"))[tier]
            mine = [r for r in rows if r["utt_id"] == utt_id]
            assert [g[2] for g in got] == [r[unit] for r in mine]
            for g, row in zip(got, mine, strict=True):
                assert row["start"] - 1e-12 <= g[0] < g[1] <= row["end"] + 1e-12
                assert g[1] == pytest.approx(row["end"])  # every item ends where TSV says
                longer += row["end_frame"] - row["start_frame"] > 1
                if in_frame[utt_id, row["start_frame"]] == 1:  # its frame not shared
                    assert g[0] == pytest.approx(row["start"])
        assert longer > 0  # the sample holds tokens of several frames


@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_textgrid_intervals_of_tdt_paths_are_the_tokens_times(data):
    """On any TDT-shaped path (tokens of max(d, 1) frames; a d = 0 token lets the next
    one in its frame), each token's interval is its [start, end) except that tokens
    sharing a frame split that frame in order, the last running on to its end; the
    intervals never overlap and a word spans its tokens'."""
    from rnntool.timestamps import TokenTime, UtteranceTimes, WordTime, frame_shares, textgrid

    s = 0.04
    steps = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=1,
                               max_size=8))  # (blank frames before, duration d)
    tokens, f = [], 0
    for u, (gap, d) in enumerate(steps):
        f += gap
        n = max(d, 1)
        tokens.append(TokenTime(u, 1, f"t{u}", None, f, f + n, f * s, (f + n) * s, f, f * s,
                                (f + n) * s, 1.0, 1.0))
        f += d
    T = max(t.end_frame for t in tokens) + data.draw(st.integers(0, 2))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(tokens) - 1), max_size=3)))
                  if len(tokens) > 1 else [])
    bounds = [0, *cuts, len(tokens)]
    words = []
    for w, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        first, last = tokens[a], tokens[b - 1]
        words.append(WordTime(w, f"w{w}", tuple(range(a, b)), first.start_frame,
                              last.end_frame, first.start, last.end, first.start, last.end,
                              1.0, 1.0))
    times = UtteranceTimes("u", T, len(tokens), s, 1.0, None, tokens, words)
    shares = frame_shares(times)
    for (a, b), tok in zip(shares, tokens, strict=True):
        group = [t for t in tokens if t.start_frame == tok.start_frame]
        j, n = group.index(tok), len(group)
        assert a == pytest.approx((tok.start_frame + j / n) * s)
        assert b == pytest.approx(tok.end if j == n - 1 else (tok.start_frame + (j + 1) / n) * s)
        if n == 1:
            assert (a, b) == (tok.start, tok.end)
    assert all(shares[i][1] <= shares[i + 1][0] for i in range(len(tokens) - 1))
    tiers = _tiers(textgrid(times))
    assert tiers["tokens"] == [(a, b, t.token) for (a, b), t in zip(shares, tokens,
                                                                    strict=True)]
    assert tiers["words"] == [(shares[w.positions[0]][0], shares[w.positions[-1]][1], w.word)
                              for w in words]
    for w in words:  # a word ends where its last token does, unless the next word's
        last = tokens[w.positions[-1]]  # first token shares that token's frame
        if w.positions[-1] + 1 == len(tokens) or \
                tokens[w.positions[-1] + 1].start_frame != last.start_frame:
            assert tiers["words"][w.index][1] == w.end
