"""rnntool.plots and the numbers it draws: gradient norms, and PNGs written atomically;
the figures: fixed colour ranges, token names (every k-th, fonts, escapes), tiny lattices."""

import io
import math
import os
import warnings

import numpy as np
import pytest
import torch
from helpers import random_batch

import rnntool.plots as plots
from rnntool import rnnt_loss
from rnntool.analysis import align_utterance, gradient_norms
from rnntool.dump import DumpWriter
from rnntool.output import OutputError
from rnntool.reader import DumpReader

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def aligned(tmp_path):
    """``read(id) -> AlignedUtterance`` (with gradient norms) of a small dump."""
    x, y, T, U = random_batch(2, 6, 3, 5, seed=13, mixed=False)
    path = tmp_path / "d.h5"
    with DumpWriter(path, vocab=list("_abcd")) as w:
        w.add_batch(x, y, T, U, utt_ids=["a", ".hidden x"])
    readers = []

    def read(utt_id):
        r = DumpReader(path)
        readers.append(r)
        return align_utterance(r, r.read(utt_id), backend="cpu", grad_norms=True)

    yield read
    for r in readers:
        r.close()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_norms_are_the_norms_of_the_full_gradient(fused, dtype):
    x, y, T, U = random_batch(1, 7, 4, 9, seed=17, dtype=dtype, mixed=False)
    if not fused:
        x = torch.log_softmax(x, -1)
    xg = x.clone().requires_grad_(True)
    rnnt_loss(xg, y, T, U, blank=0, reduction="sum", fused_log_softmax=fused).backward()
    want = torch.linalg.vector_norm(xg.grad[0].double(), dim=-1).numpy()
    got = gradient_norms(x[0].numpy(), y[0].numpy(), blank=0, fused=fused)
    assert got.shape == (7, 5) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
    assert (got > 0).any()


def test_align_utterance_carries_the_gradient_norms(aligned, tmp_path):
    a = aligned("a")
    assert a.finite and a.grad_norm.shape == a.alignment.occupancy.shape
    with DumpReader(tmp_path / "d.h5") as r:
        u = r.read("a")
    want = gradient_norms(u.logits, u.labels, blank=0)
    assert np.array_equal(a.grad_norm, want)


def test_save_png_writes_a_whole_png_named_from_the_id(aligned, tmp_path):
    out = tmp_path / "png"
    out.mkdir()
    dest = plots.save_png(out, aligned("a"))
    assert dest == out / "a.png"
    assert dest.read_bytes()[:8] == PNG_MAGIC
    # An id becomes a confined name: percent-encoded, never a hidden file.
    dest = plots.save_png(out, aligned(".hidden x"))
    assert dest == out / "%2Ehidden%20x.png" and dest.read_bytes()[:8] == PNG_MAGIC
    assert sorted(os.listdir(out)) == ["%2Ehidden%20x.png", "a.png"]  # no temporary file left


def test_save_png_is_atomic(aligned, tmp_path, monkeypatch):
    out = tmp_path / "png"
    out.mkdir()
    (out / "a.png").write_bytes(b"old")
    a = aligned("a")

    def half_then_fail(f, **kw):
        f.write(PNG_MAGIC)
        raise RuntimeError("the figure broke")

    monkeypatch.setattr(plots, "plot_utterance", half_then_fail)
    with pytest.raises(RuntimeError, match="the figure broke"):
        plots.save_png(out, a)
    # The old file is untouched and no partial or temporary file is left.
    assert (out / "a.png").read_bytes() == b"old"
    assert os.listdir(out) == ["a.png"]
    monkeypatch.undo()
    plots.save_png(out, a)
    assert (out / "a.png").read_bytes()[:8] == PNG_MAGIC


def test_save_png_replaces_a_planted_link_and_never_an_input(aligned, tmp_path):
    out = tmp_path / "png"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (out / "a.png").symlink_to(victim)
    plots.save_png(out, aligned("a"))
    assert not (out / "a.png").is_symlink() and (out / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert victim.read_bytes() == b"keep"
    # A PNG name that is one of the inputs is refused, and the input stays as it was.
    (out / "a.png").unlink()
    (out / "a.png").write_bytes(b"an input")
    with pytest.raises(OutputError, match="is also an input"):
        plots.save_png(out, aligned("a"), inputs=[out / "a.png"])
    assert (out / "a.png").read_bytes() == b"an input"


def test_save_png_needs_gradient_norms(aligned, tmp_path):
    a = aligned("a")
    a.grad_norm = None
    with pytest.raises(ValueError, match="no gradient norms"):
        plots.save_png(tmp_path, a)
    assert os.listdir(tmp_path) == ["d.h5"]


def test_long_utterances_are_downsampled(tmp_path):
    T, U1 = 2500, 4
    occ = np.full((T, U1), 0.25)
    path = np.array([(t, 0) for t in range(T)] + [(T - 1, u) for u in range(1, U1)])
    gn = np.random.default_rng(0).random((T, U1))
    with open(tmp_path / "long.png", "wb") as f:
        plots.plot_utterance(f, utt_id="long", loss=1.0, best_log_prob=-2.0, occupancy=occ,
                             best_path=path, grad_norm=gn, tokens=["a", "b", "c"])
    assert (tmp_path / "long.png").read_bytes()[:8] == PNG_MAGIC
    # Block maxima, NaN-padded edges ignored.
    assert plots._block_max(np.arange(12.0).reshape(4, 3), 3, 2).tolist() == [[7.0, 8.0],
                                                                             [10.0, 11.0]]


# --------------------------------------------------------------------------- the figure
def arrays(T, U, *, occ=0.5, gn=0.1):
    """Arrays for ``build_figure``: constant occupancy and gradient norm, an L-shaped path."""
    path = np.array([(t, 0) for t in range(T)] + [(T - 1, u) for u in range(1, U + 1)])
    return dict(utt_id="u", loss=1.0, best_log_prob=-2.0, occupancy=np.full((T, U + 1), occ),
                best_path=path, grad_norm=np.full((T, U + 1), gn))


def drawn_quietly(fig):
    """Render ``fig`` as a PNG (glyphs are looked up only then); no warning may be raised."""
    buf = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.savefig(buf, format="png", dpi=50)
    assert [str(w.message) for w in caught] == []
    assert buf.getvalue()[:8] == PNG_MAGIC


def ytick_names(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def visible_ticks(axis):
    lo, hi = sorted(axis.get_view_interval())
    return [v for v in axis.get_majorticklocs() if lo <= v <= hi]


def test_colour_ranges_are_fixed_and_the_same_in_every_figure(aligned):
    # Two utterances with very different gradient norms get the same colour scales.
    figs = [plots.build_figure(**arrays(6, 3, gn=1e-3)),
            plots.build_figure(**arrays(6, 3, occ=1e-11, gn=1e-11)),
            plots.build_figure(**{**arrays(6, 3), "grad_norm": np.geomspace(1e-12, 1.4, 24)
                                  .reshape(6, 4)})]
    for fig in figs:
        occ_ax, grad_ax = fig.axes[:2]
        (occ_im,), (grad_im,) = occ_ax.images, grad_ax.images
        assert (occ_im.norm.vmin, occ_im.norm.vmax) == plots.OCCUPANCY_RANGE == (-8.0, 0.0)
        assert (grad_im.norm.vmin, grad_im.norm.vmax) == plots.GRAD_NORM_RANGE == (-8.0, 0.5)
        # Values below the range are clipped: the colour bars say so with an arrow.
        assert occ_im.colorbar.extend == grad_im.colorbar.extend == "min"
        drawn_quietly(fig)
    # The documented bound: a norm is at most sqrt(2) x the occupancy, below the top.
    a = aligned("a")
    assert (a.grad_norm <= math.sqrt(2) * a.alignment.occupancy + 1e-12).all()
    assert math.log10(math.sqrt(2)) < plots.GRAD_NORM_RANGE[1]


@pytest.mark.parametrize("U, k", [(0, 1), (39, 1), (40, 2), (59, 2), (60, 2), (130, 4),
                                  (400, 11)])
def test_every_kth_token_is_named_and_the_axis_says_so(U, k):
    tokens = [f"t{i}" for i in range(U)]
    fig = plots.build_figure(**arrays(3, U), tokens=tokens)
    for ax in fig.axes[:2]:
        ticks = list(range(0, U + 1, k))
        assert len(ticks) <= plots.MAX_NAMES
        assert list(ax.get_yticks()) == ticks
        assert ytick_names(ax) == ["∅", *(tokens[u - 1] for u in ticks[1:])]
        label = ax.get_ylabel()
        assert label.startswith("labels emitted u")
        assert (f"every {plots._ordinal(k)} token named" in label) == (k > 1)
    drawn_quietly(fig)


def test_ordinals():
    assert [plots._ordinal(k) for k in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "23rd", "101st",
        "111th"]


@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("tokens", [[], None])
def test_no_labels_gives_one_row_and_integer_ticks(T, tokens):
    fig = plots.build_figure(**arrays(T, 0), tokens=tokens)
    for ax in fig.axes[:2]:
        assert tuple(ax.get_ylim()) == (-0.5, 0.5) and tuple(ax.get_xlim()) == (-0.5, T - 0.5)
        assert visible_ticks(ax.yaxis) == [0]
        assert visible_ticks(ax.xaxis) == list(range(T))
        if tokens is not None:
            assert ytick_names(ax) == ["∅"]
    # One node (T = 1, U = 0): the path is a dot, not an invisible line.
    (line,) = fig.axes[0].get_lines()
    assert (line.get_marker() == "o") == (T == 1)
    drawn_quietly(fig)


def test_titles_have_balanced_parentheses():
    fig = plots.build_figure(**arrays(3, 2), tokens=["a", "b"])
    titles = [ax.get_title() for ax in fig.axes[:2]] + [fig.get_suptitle()]
    assert titles[0] == "log10 P(the alignment passes through (t, u))"
    for title in titles:
        depth = 0
        for c in title:
            depth += {"(": 1, ")": -1}.get(c, 0)
            assert depth >= 0, title
        assert depth == 0, title


def has_glyphs(text):
    """Whether an installed font (not a placeholder font) draws every character of text."""
    from matplotlib.font_manager import fontManager

    need = {ord(c) for c in text}
    return any(need <= plots._charmap(e.fname, e.index) for e in fontManager.ttflist
               if not e.name.startswith(plots._PLACEHOLDER_FONTS))


CJK = ["你好", "こんにちは", "한국어", "カタカナ"]


def test_names_in_scripts_the_default_font_lacks_draw_without_warnings():
    fig = plots.build_figure(**arrays(5, 4), tokens=CJK, labels=[7, 8, 9, 10])
    names = ytick_names(fig.axes[0])
    drawn_quietly(fig)  # no "Glyph missing" warnings, whatever fonts this machine has
    if has_glyphs("".join(CJK)):
        assert names == ["∅", *CJK]
        assert "#N" not in fig.axes[0].get_ylabel()
    else:  # no font: the token ids, and the axis says what they are
        assert names == ["∅", "#7", "#8", "#9", "#10"]
        assert "#N: token id" in fig.axes[0].get_ylabel()


def test_without_ids_undrawable_characters_are_escaped_and_the_id_too():
    fig = plots.build_figure(**{**arrays(3, 1), "utt_id": "发言001"}, tokens=["你好"])
    drawn_quietly(fig)
    if not has_glyphs("你好发言"):
        assert ytick_names(fig.axes[0]) == ["∅", "\\u4f60\\u597d"]
        assert fig.get_suptitle().startswith("\\u53d1\\u8a00001   loss")


def test_a_font_with_the_glyphs_is_chosen(monkeypatch):
    # DejaVu Sans Mono as the default font lacks characters DejaVu Sans has: a name
    # using them is drawn with a font that has them (as a CJK name is where a CJK font
    # is installed), without warnings.
    import matplotlib
    from matplotlib.font_manager import FontProperties, findfont

    mono = plots._charmap(os.fspath(findfont(FontProperties(family="DejaVu Sans Mono"))))
    sans = plots._charmap(os.fspath(findfont(FontProperties(family="DejaVu Sans"))))
    extra = sorted(c for c in sans - mono if chr(c).isalpha())[:3]
    assert extra
    name = "".join(map(chr, extra))
    with matplotlib.rc_context({"font.family": "DejaVu Sans Mono"}):
        fig = plots.build_figure(**arrays(3, 1), tokens=[name], labels=[4])
        assert ytick_names(fig.axes[0]) == ["∅", name]
        family = fig.axes[0].get_yticklabels()[1].get_fontfamily()
        assert family[0] == "DejaVu Sans Mono" and len(family) == 2
        drawn_quietly(fig)
        # The choice is cached.
        hits = plots._fallback_font.cache_info().hits
        plots.build_figure(**arrays(3, 1), tokens=[name], labels=[4])
        assert plots._fallback_font.cache_info().hits == hits + 1


def test_display_names_escape_control_characters_and_are_cut():
    assert plots.display_name("a\nb\tc") == "a\\nb\\tc"
    assert plots.display_name("\x00\x7f\u200b\u2028", 40) == "\\x00\\x7f\\u200b\\u2028"
    assert plots.display_name("") == "''"
    assert plots.display_name("▁the") == "▁the"
    long = plots.display_name("x" * 40)
    assert long == "x" * 15 + "…" and len(long) == plots.NAME_CHARS
    # Never cut inside an escape.
    assert plots.display_name("abcdefghijklm\x01z") == "abcdefghijklm…"
    assert plots.display_name("你好", drawable=frozenset(map(ord, "你"))) == "你\\u597d"


def test_odd_names_are_drawn_as_they_are(aligned):
    tokens = ["a\nb", "\x00", "x" * 100, "$x$", "$", "", "a\\b"]
    fig = plots.build_figure(**arrays(4, len(tokens)), tokens=tokens)
    labels = fig.axes[0].get_yticklabels()
    assert [t.get_text() for t in labels] == [
        "∅", "a\\nb", "\\x00", "x" * 15 + "…", "$x$", "$", "''", "a\\b"]
    assert not any(t.get_parse_math() for t in labels)  # "$x$" is no formula
    assert not fig._suptitle.get_parse_math()
    drawn_quietly(fig)


@pytest.mark.parametrize("kind", ["full", "lattice"])
def test_save_png_with_a_cjk_vocab_warns_nothing(tmp_path, kind):
    x, y, T, U = random_batch(1, 5, 3, 5, seed=3, mixed=False)
    path = tmp_path / "d.h5"
    with DumpWriter(path, vocab=["_", *CJK], kind=kind) as w:
        w.add_batch(x, y, T, U, utt_ids=["发言"])
    out = tmp_path / "png"
    out.mkdir()
    with DumpReader(path) as r, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        utt = r.read("发言") if kind == "full" else r.read_lattice("发言")
        a = align_utterance(r, utt, backend="cpu", grad_norms=True)
        dest = plots.save_png(out, a)
    assert [str(w.message) for w in caught] == []
    assert dest.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(("T", "U"), [(1, 0), (4, 2), (9, 3)])
def test_a_path_ending_after_the_last_frame_is_shown_and_marked(T, U):
    """A TDT path ends at (T, U), past the heatmaps' last column (t = T - 1): the t axis
    runs on to show it, and the end is marked; an RNN-T path keeps the heatmap's edge."""
    steps = [(t, min(t, U)) for t in range(T)]
    path = np.array([*steps, (T, U)])
    fig = plots.build_figure(**{**arrays(T, U), "best_path": path}, path_markers=True)
    for ax in fig.axes[:2]:
        lo, hi = ax.get_xlim()
        assert lo == -0.5 and hi == T + 0.5 > T  # the end node inside the axes
    lines = fig.axes[0].get_lines()
    assert lines[0].get_xydata().tolist() == path.tolist()
    (end,) = [ln for ln in lines if ln.get_marker() == "s"]
    assert end.get_xydata().tolist() == [[T, U]]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert f"end ({T}, {U}), after the last frame" in legend
    drawn_quietly(fig)
    rnnt = plots.build_figure(**arrays(T, U))  # ends at (T - 1, U): nothing added
    assert all(ax.get_xlim() == (-0.5, T - 0.5) for ax in rnnt.axes[:2])
    assert [ln.get_marker() for ln in rnnt.axes[0].get_lines()] != ["s"]
    assert len(rnnt.axes[0].get_lines()) == 1


def test_the_sample_tdt_paths_end_inside_the_figure():
    from helpers import ROOT

    with DumpReader(ROOT / "sample_data" / "sample-tdt.h5") as r:
        for utt_id in r.utt_ids[:3]:
            aligned = align_utterance(r, r.read(utt_id), backend="cpu", grad_norms=True)
            al = aligned.alignment
            fig = plots.build_figure(utt_id=utt_id, loss=al.loss,
                                     best_log_prob=al.best_log_prob, occupancy=al.occupancy,
                                     best_path=al.path, grad_norm=aligned.grad_norm,
                                     path_markers=True)
            T = al.occupancy.shape[0]
            assert al.path[-1, 0] == T
            lo, hi = fig.axes[0].get_xlim()
            assert lo < al.path[:, 0].min() and al.path[:, 0].max() < hi


def test_inputs_sharing_a_file_stem_get_their_own_directories(tmp_path):
    """exp1/dev.h5 and exp2/dev.h5 (two checkpoints' dumps, named alike): each gets its
    own PNG directory, dev~1 and dev~2, instead of the second overwriting the first."""
    import shutil

    from helpers import SAMPLE, invoke

    for exp in ("exp1", "exp2"):
        (tmp_path / exp).mkdir()
        shutil.copy(SAMPLE, tmp_path / exp / "dev.h5")
    shutil.copy(SAMPLE, tmp_path / "other.h5")
    out = tmp_path / "png"
    r = invoke("plot", tmp_path / "exp1" / "dev.h5", tmp_path / "exp2" / "dev.h5",
               tmp_path / "other.h5", "--utt", "utt004", "-d", out, "-q")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "dev~1/utt004.png", "dev~2/utt004.png", "other/utt004.png"]
