"""rnntool.plots and the numbers it draws: gradient norms, and PNGs written atomically."""

import os

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
