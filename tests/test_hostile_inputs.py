"""Broken and hostile input files: never a wrong number, a hang, a crash or a traceback.

Each case builds its file here (mostly with h5py directly, since DumpWriter
refuses to write them) and asserts what a user sees: one line on stderr naming
the file (and the utterance), exit code 2, no traceback; or, for files that are
odd but legal (links, user blocks, big-endian, compact storage), the same
numbers as the plain file.
"""

import contextlib
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from helpers import (
    invoke,
    one_line_error,
    random_batch,
    rows_of,
    run_cli,
    write_lattice_raw,
    write_padded,
)

from rnntool.dump import DumpError, DumpWriter
from rnntool.reader import DumpReader
from rnntool.score import score_reader


def plain(tmp_path, name="d.h5", n=3, seed=5, dtype=np.float32, **kw):
    """A keyed dump of ``n`` utterances; returns its path and the tensors."""
    x, y, T, U = random_batch(n, 6, 3, 5, seed=seed, mixed=False)
    path = tmp_path / name
    with DumpWriter(path, blank=0, **kw) as w:
        w.add_batch(x.numpy().astype(dtype), y, T, U, utt_ids=[f"u{i}" for i in range(n)])
    return path, (x, y, T, U)


def losses(path, *args):
    result = invoke("score", path, "-f", "tsv", "-q", *args)
    assert result.exit_code == 0, result.output
    return {r["utt_id"]: r["loss"] for r in rows_of(result.stdout)}


# --------------------------------------------------------------------------- links
def test_external_link_utterance_is_scored_from_its_own_file(tmp_path):
    # The example: the memory-mapped path took the offset inside the link's
    # target but read the file named on the command line.
    target, _ = plain(tmp_path, "target.h5", n=2, seed=7)
    other, _ = plain(tmp_path, "other.h5", n=2, seed=8)
    want = losses(target)
    with h5py.File(other, "a") as f:
        f["utts"]["u1"].move("logits", "old")  # keep the file's bytes, hide the dataset
        f["utts"]["u1"]["logits"] = h5py.ExternalLink("target.h5", "/utts/u1/logits")
        f["utts"]["x"] = h5py.ExternalLink("target.h5", "/utts/u0")
    with h5py.File(other, "a") as f:
        del f["utts"]["u1"]["old"]
        f["utts"]["u1"]["labels"][...] = h5py.File(target)["utts"]["u1"]["labels"][()]
    got = losses(other)
    assert got["x"] == want["u0"] and got["u1"] == want["u1"]
    assert losses(other, "--via-hdf5") == got


def test_external_link_to_a_fifo_or_device_is_refused_without_hanging(tmp_path):
    path, _ = plain(tmp_path, n=1)
    os.mkfifo(tmp_path / "fifo.h5")
    with h5py.File(path, "a") as f:
        f["utts"]["f"] = h5py.ExternalLink(str(tmp_path / "fifo.h5"), "/x")
    one_line_error(run_cli("score", path, timeout=30), path, "fifo.h5", "FIFO")
    with h5py.File(path, "a") as f:
        del f["utts"]["f"]
        f["utts"]["f"] = h5py.ExternalLink("/dev/zero", "/x")
    one_line_error(run_cli("score", path, timeout=30), "/dev/zero", "character device")


def test_dangling_and_missing_links(tmp_path):
    path, _ = plain(tmp_path, n=1)
    with h5py.File(path, "a") as f:
        f["utts"]["soft"] = h5py.SoftLink("/utts/nowhere")
    one_line_error(invoke("score", path), path, "does not resolve")
    with h5py.File(path, "a") as f:
        del f["utts"]["soft"]
        f["utts"]["ext"] = h5py.ExternalLink("missing.h5", "/x")
    one_line_error(invoke("score", path), path, "missing.h5", "does not exist")


def test_soft_link_and_hard_link_utterances_give_the_same_numbers(tmp_path):
    path, _ = plain(tmp_path, n=2)
    want = losses(path)
    with h5py.File(path, "a") as f:
        f["utts"]["soft"] = h5py.SoftLink("/utts/u0")
        f["utts"]["hard"] = f["utts"]["u1"]
    got = losses(path)
    assert got["soft"] == want["u0"] and got["hard"] == want["u1"]


def test_data_in_other_files_is_refused(tmp_path):
    # External raw storage: HDF5 would read any file (a FIFO: hang; /dev/zero: zeros).
    path, _ = plain(tmp_path, n=1)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.zeros(6 * 4 * 5, np.float32).tobytes())
    with h5py.File(path, "a") as f:
        g = f["utts"].create_group("ext")
        g.create_dataset("logits", (6, 4, 5), np.float32, external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
        g["labels"] = np.array([1, 2, 3])
    one_line_error(invoke("score", path), path, "utterance ext", "external files")
    # A virtual dataset: its sources may be missing (HDF5 then reads its fill value).
    with h5py.File(path, "a") as f:
        del f["utts"]["ext"]
        g = f["utts"].create_group("virt")
        layout = h5py.VirtualLayout((6, 4, 5), np.float32)
        layout[...] = h5py.VirtualSource(str(tmp_path / "gone.h5"), "x", (6, 4, 5))
        g.create_virtual_dataset("logits", layout)
        g["labels"] = np.array([1, 2, 3])
    one_line_error(invoke("score", path), path, "utterance virt", "virtual dataset")


# --------------------------------------------------------------------------- what is not a file
@pytest.mark.parametrize("kind", ["fifo", "chardev", "dir", "symlink-to-fifo"])
def test_only_regular_files_are_opened(tmp_path, kind):
    target = {"fifo": tmp_path / "x.h5", "chardev": "/dev/null", "dir": tmp_path,
              "symlink-to-fifo": tmp_path / "l.h5"}[kind]
    if kind in ("fifo", "symlink-to-fifo"):
        os.mkfifo(tmp_path / "x.h5")
    if kind == "symlink-to-fifo":
        os.symlink(tmp_path / "x.h5", target)
    for cmd in ("score", "inspect", "align"):
        out = run_cli(cmd, target, timeout=30)
        one_line_error(out, target)
        assert any(w in out.stderr for w in ("FIFO", "device", "directory")), out.stderr


# --------------------------------------------------------------------------- padded layout
def padded(tmp_path, **over):
    x, y, T, U = random_batch(3, 5, 3, 6, seed=3, mixed=False)
    arrays = {"logits": x.numpy(), "labels": y.numpy(), "t_len": T.numpy(), "u_len": U.numpy()}
    arrays.update(over)
    path = tmp_path / "p.h5"
    write_padded(path, arrays["logits"], arrays["labels"], arrays["t_len"], arrays["u_len"],
                 utt_ids=over.get("ids"))
    return path


def test_padded_duplicate_ids_are_an_error(tmp_path):
    # The example: both "a" rows showed the second utterance's loss.
    one_line_error(invoke("score", padded(tmp_path, ids=["a", "a", "c"])), "p.h5",
             "utterance id a appears twice", "entries 0 and 1")


@pytest.mark.parametrize("what, over, fragment", [
    ("float labels", {"labels": np.array([[1.0, 2.6, 3.2]] * 3)}, "/labels has dtype float64"),
    ("float lengths", {"t_len": np.array([5.0, 2.7, 5.0])}, "/logit_lengths has dtype float64"),
    ("nan lengths", {"u_len": np.array([3.0, np.nan, 3.0])}, "/label_lengths has dtype float64"),
    ("bool lengths", {"u_len": np.array([True, True, True])}, "/label_lengths has dtype bool"),
    ("2-D lengths", {"t_len": np.array([[5], [5], [5]])}, "/logit_lengths must be a 1-D"),
    ("huge uint64 length", {"t_len": np.array([5, 2**64 - 1, 5], np.uint64)},
     "logit_lengths[1] = 18446744073709551615"),
    ("uint64 label", {"labels": np.array([[1, 2, 3], [1, 2**64 - 3, 3], [1, 2, 3]], np.uint64)},
     "labels[1] = 18446744073709551613 is outside [0, 6)"),
    ("empty id", {"ids": ["a", "", "c"]}, "/utt_ids[1] is empty"),
    ("float ids", {"ids": None, "float_ids": True}, "/utt_ids has dtype float64"),
])
def test_padded_values_as_stored(tmp_path, what, over, fragment):
    float_ids = over.pop("float_ids", False)
    path = padded(tmp_path, **over)
    if float_ids:
        with h5py.File(path, "a") as f:
            f["utt_ids"] = np.array([0.5, 1.5, 2.5])
    one_line_error(invoke("score", path), "p.h5", fragment)


# --------------------------------------------------------------------------- sizes and storage
def test_declared_size_beyond_the_file_is_refused_before_allocating(tmp_path):
    # The example: (1e6, 1001, 1000) float32 declared in a few KB.
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("utts").create_group("big")
        g.create_dataset("logits", (10**6, 1001, 1000), np.float32)  # never written
        g["labels"] = np.ones(1000, np.int64)
    assert path.stat().st_size < 100_000
    one_line_error(invoke("score", path), path, "utterance big", "never written")
    with h5py.File(path, "w") as f:
        g = f.create_group("utts").create_group("big")
        g.create_dataset("logits", (10**6, 1001, 1000), np.float32, chunks=(1, 1001, 1000),
                         compression="gzip")
        g["logits"][0] = 1.0  # one chunk of a million
        g["labels"] = np.ones(1000, np.int64)
    one_line_error(invoke("score", path), path, "utterance big", "only 1 of its 1000000 chunks")


def test_memory_budget_is_checked_before_allocating(tmp_path, monkeypatch):
    path, _ = plain(tmp_path, n=2)
    import rnntool.reader as reader

    monkeypatch.setattr(reader, "available_memory", lambda: 100)
    for cmd in ("score", "align"):
        one_line_error(invoke(cmd, path), path, "more than the", "of memory available")
    result = invoke("inspect", path)  # inspect reports it as a problem of each utterance
    assert result.exit_code == 1 and "utterance u0: its logits need" in result.stderr


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.75, 0.9, 0.99])
def test_truncated_dump_is_an_error_never_zeros(tmp_path, cut):
    path, _ = plain(tmp_path, n=4)
    want = losses(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    for args in ((), ("--via-hdf5",)):
        result = invoke("score", path, "-f", "tsv", "-q", *args)
        if result.exit_code == 0:  # only bytes nothing points at were cut
            assert {r["utt_id"]: r["loss"] for r in rows_of(result.stdout)} == want
        else:
            one_line_error(result, path)


def test_file_truncated_or_rewritten_while_read(tmp_path):
    # The example: another process rewrites the dump while score reads it;
    # HDF5 reads zeros past the end of the file, the mapped path died of SIGBUS.
    path, _ = plain(tmp_path, n=3)
    size = path.stat().st_size
    for direct in (True, False):
        with DumpReader(path, direct=direct) as r:
            items = r.checked(r.utt_ids)
            os.truncate(path, size // 2)
            with pytest.raises(DumpError, match="changed while it was being read"):
                list(score_reader(r, r.utt_ids))
            assert items
        path.unlink()
        path, _ = plain(tmp_path, n=3)
    with DumpReader(path) as r:  # same size, new bytes
        data = bytearray(path.read_bytes())
        time.sleep(0.01)
        data[-1] ^= 1
        path.write_bytes(bytes(data))
        with pytest.raises(DumpError, match="changed while it was being read"):
            r.read("u0")
    with DumpReader(path) as r:  # replaced by another file under the same name
        path.rename(tmp_path / "moved.h5")
        plain(tmp_path, n=3, seed=9)
        with pytest.raises(DumpError, match="changed while it was being read"):
            r.read("u0")


def test_partly_written_chunks_are_refused(tmp_path):
    path = tmp_path / "part.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("utts").create_group("p")
        ds = g.create_dataset("logits", (8, 3, 5), np.float32, chunks=(2, 3, 5))
        ds[:4] = 0.5  # chunks 0 and 1 of 4
        g["labels"] = np.array([1, 2])
    one_line_error(invoke("score", path), path, "utterance p", "only 2 of its 4 chunks")


# --------------------------------------------------------------------------- legal oddities
def test_user_block_big_endian_and_compact_storage_give_the_same_numbers(tmp_path):
    path, (x, y, T, U) = plain(tmp_path, n=2)
    want = losses(path)
    odd = tmp_path / "odd.h5"
    with h5py.File(path) as src, h5py.File(odd, "w", userblock_size=4096) as f:
        f.attrs.update(dict(src.attrs))
        for u in ("u0", "u1"):
            g = f.create_group(f"utts/{u}")
            logits = src["utts"][u]["logits"][()]
            if u == "u0":
                g.create_dataset("logits", data=logits.astype(">f4"))
            else:
                space = h5py.h5s.create_simple(logits.shape)
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_layout(h5py.h5d.COMPACT)
                h5py.h5d.create(g.id, b"logits", h5py.h5t.IEEE_F32LE, space, dcpl=dcpl).write(
                    h5py.h5s.ALL, h5py.h5s.ALL, logits)
            g["labels"] = src["utts"][u]["labels"][()]
    assert losses(odd) == want
    assert losses(odd, "--via-hdf5") == want


def test_user_block_region_read_directly_matches_hdf5(tmp_path):
    path = tmp_path / "ub.h5"
    x = np.random.default_rng(0).standard_normal((7, 3, 5)).astype(np.float32)
    with h5py.File(path, "w", userblock_size=512) as f:
        g = f.create_group("utts/a")
        g["logits"] = x
        g["labels"] = np.array([1, 2])
    with DumpReader(path) as r:
        assert r.info("a").region is not None
        got = r.read("a").logits
        assert r._direct_ok is True
    np.testing.assert_array_equal(got, x)


# --------------------------------------------------------------------------- attributes
@pytest.mark.parametrize("attrs, fragment", [
    ({"blank": 1.5}, "attribute blank = 1.5 is not an integer"),
    ({"blank": "x"}, "attribute blank = 'x' is not an integer"),
    ({"blank": True}, "attribute blank = True is not an integer"),
    ({"format_version": 4}, "format_version 4 is newer"),
    ({"format": "other"}, "attribute format = 'other'"),
    ({"input_kind": 3}, "attribute input_kind = 3"),
    ({"vocab_size": 0}, "attribute vocab_size = 0"),
])
def test_bad_root_attributes(tmp_path, attrs, fragment):
    path, _ = plain(tmp_path, n=1)
    with h5py.File(path, "a") as f:
        f.attrs.update(attrs)
    for cmd in ("score", "inspect"):
        one_line_error(invoke(cmd, path), path, fragment)


def test_vocab_must_agree_with_vocab_size(tmp_path):
    # The example: 3 names where vocab_size is 6 gave an IndexError in align/plot.
    path, _ = plain(tmp_path, n=1)
    with h5py.File(path, "a") as f:
        f["vocab"] = np.array(["a", "b", "c"], dtype=h5py.string_dtype())
        f.attrs["vocab_size"] = 5
    for cmd in (("score",), ("align",), ("plot", "-d", tmp_path / "plots")):
        one_line_error(invoke(*cmd, path), path, "/vocab has 3 names but attribute vocab_size is 5")
    with h5py.File(path, "a") as f:
        del f["vocab"]
        f["vocab"] = np.arange(5)
    one_line_error(invoke("align", path), path, "/vocab has dtype int64, not strings")
    with h5py.File(path, "a") as f:
        del f["vocab"]
        f.attrs["vocab_size"] = -1
        f["vocab"] = np.array(["a", "b", "c"], dtype=h5py.string_dtype())
    one_line_error(invoke("align", path), path, "utterance u0", "V = 5 but the dump's vocab size is 3")


@pytest.mark.parametrize("value, fragment", [
    ("low", "attribute loss = 'low' is not a number"),
    (np.array([1.0, 2.0]), "attribute loss = [1. 2.] is not a number"),
    (True, "attribute loss = True is not a number"),
])
def test_bad_stored_loss(tmp_path, value, fragment):
    path, _ = plain(tmp_path, n=2)
    with h5py.File(path, "a") as f:
        f["utts"]["u1"].attrs["loss"] = value
    one_line_error(invoke("score", path), path, "utterance u1", fragment)


# --------------------------------------------------------------------------- ids in messages
@pytest.mark.parametrize("name", ["bad\nid", "bad\rid", "esc\x1b[31mred", "tab\tid"])
def test_error_lines_stay_one_line_whatever_the_id(tmp_path, name):
    path, _ = plain(tmp_path, n=1)
    with h5py.File(path, "a") as f:
        g = f["utts"].create_group(name)
        g["logits"] = np.zeros((2, 2, 5), np.float32)
        g["labels"] = np.array([7])
    line = one_line_error(invoke("score", path), path, "labels[0] = 7")
    assert repr(name)[1:-1] in line


def test_non_utf8_id_is_one_line(tmp_path):
    path, _ = plain(tmp_path, n=1)
    with h5py.File(path, "a") as f:
        f["utts"].create_group(b"a\xffb")
    one_line_error(invoke("score", path), path, "a\\xffb", "not UTF-8")


def test_nan_logits_are_not_hidden_by_the_reader(tmp_path):
    path, (x, y, T, U) = plain(tmp_path, n=2)
    with h5py.File(path, "a") as f:
        f["utts"]["u1"]["logits"][2, 1, 3] = np.nan
    for args in ((), ("--via-hdf5",)):
        result = invoke("score", path, "-q", "-f", "tsv", *args)
        assert result.exit_code == 1 and "utterance u1: loss is nan" in result.stderr
    result = invoke("align", path, "-f", "tsv")
    assert result.exit_code == 1 and "utterance u1: loss is nan" in result.stderr
    assert {r["utt_id"] for r in rows_of(result.stdout)} == {"u0"}


def test_sigbus_cannot_happen_reading_a_shrinking_file(tmp_path):
    # Truncating a dump while `score` reads it killed the process with SIGBUS
    # (no message). Reads are preads now: a shrinking file is an error line.
    x = np.random.default_rng(1).standard_normal((400, 30, 64)).astype(np.float32)
    path = tmp_path / "big.h5"
    with DumpWriter(path) as w:
        for i in range(40):
            w.add(f"u{i}", x, np.arange(1, 30))
    proc = subprocess.Popen([sys.executable, "-m", "rnntool", "score", str(path), "-q",
                             "--batch-mb", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    # Cut as soon as the command holds the file open (then it is reading it).
    fds = f"/proc/{proc.pid}/fd"
    for _ in range(2000):
        with contextlib.suppress(OSError):
            if any(os.readlink(f"{fds}/{n}") == str(path) for n in os.listdir(fds)):
                break
        time.sleep(0.005)
    if proc.poll() is not None:  # done before the cut: this run shows nothing
        pytest.skip("score finished before the file was cut")
    os.truncate(path, path.stat().st_size // 3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, (proc.returncode, err)  # not -SIGBUS, not 0 with zeros
    # One line naming the file: "changed while it was being read", or, when the cut lands
    # while HDF5 parses the structure, "unreadable (...)".
    assert err.count("\n") == 1 and err.startswith(f"rnntool: error: {path}: "), err


# --------------------------------------------------------------------------- ids as names
def test_plot_names_from_hostile_ids_stay_in_the_output_directory(tmp_path):
    # The example: an id "/../../../../tmp/x" wrote /tmp/x.png outside out/.
    ids = ["/../../../../" + str(tmp_path / "escaped"), "../up", "..", ".", "a/b", "%2F"]
    x, y, T, U = random_batch(len(ids), 4, 2, 5, seed=2, mixed=False)
    path = tmp_path / "p.h5"
    write_padded(path, x.numpy(), y.numpy(), T.numpy(), U.numpy(), utt_ids=ids)
    out = tmp_path / "deep" / "out"
    result = invoke("plot", path, "-d", out, "-q")
    assert result.exit_code == 0, result.output
    made = sorted(p.name for p in out.iterdir())
    assert len(made) == len(ids) and all(n.endswith(".png") for n in made), made
    assert not any(n.startswith(".") for n in made)
    outside = {p for p in tmp_path.rglob("*") if p.is_file()} - {path} - set(out.iterdir())
    assert outside == set(), outside


def test_table_shows_ids_as_they_are(tmp_path):
    ids = ["[red]x[/red]", "esc\x1b[2Jid"]
    x, y, T, U = random_batch(2, 4, 2, 5, seed=2, mixed=False)
    path = tmp_path / "p.h5"
    write_padded(path, x.numpy(), y.numpy(), T.numpy(), U.numpy(), utt_ids=ids)
    result = invoke("score", path, "-f", "table", "-q")
    assert result.exit_code == 0, result.output
    assert "[red]x[/red]" in result.stdout and "\x1b" not in result.stdout
    assert "esc\\x1b[2Jid" in result.stdout


# --------------------------------------------------------------------------- found by fuzzing
def test_utterances_of_different_v_are_never_batched_together(tmp_path):
    # A keyed dump with neither vocab_size nor /vocab: V may differ per utterance.
    rng = np.random.default_rng(0)
    path = tmp_path / "mixv.h5"
    with h5py.File(path, "w") as f:
        for name, V in (("a", 4), ("b", 7), ("c", 4)):
            g = f.create_group(f"utts/{name}")
            g["logits"] = rng.standard_normal((5, 3, V)).astype(np.float32)
            g["labels"] = np.array([1, V - 1])
    together = losses(path)
    alone = {u: losses(path, "--utt", u)[u] for u in "abc"}
    assert together == alone
    assert losses(path, "--via-hdf5") == alone


def test_non_standard_float_types_are_converted_by_hdf5_not_read_raw(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "norm.h5"
    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    with h5py.File(path, "w") as f:
        a = f.create_group("utts/a")  # a standard one first: the raw-read probe passes
        a["logits"] = rng.standard_normal((2, 2, 4)).astype(np.float32)
        a["labels"] = np.array([1])
        b = f.create_group("utts/b")
        b["labels"] = np.array([1, 2])
        t = h5py.h5t.IEEE_F32LE.copy()
        t.set_norm(h5py.h5t.NORM_NONE)  # h5py still calls it float32
        d = h5py.h5d.create(b.id, b"logits", t, h5py.h5s.create_simple(x.shape))
        d.write(h5py.h5s.ALL, h5py.h5s.ALL, x)
        c = f.create_group("utts/c")
        c["labels"] = np.array([1, 2])
        c["logits"] = x
    got = losses(path)
    assert got["b"] == losses(path, "--via-hdf5")["b"] == losses(path, "--utt", "b")["b"]
    with DumpReader(path) as r:
        assert r.info("b").region is None and r.info("c").region is not None


def test_a_chunk_outside_the_extent_does_not_count(tmp_path):
    x = np.full((5, 3, 4), 1.0, np.float32)
    path = tmp_path / "extent.h5"
    with h5py.File(path, "w") as f:
        d = f.create_dataset("utts/u/logits", shape=x.shape, chunks=(1, 3, 4), dtype=np.float32)
        for t in (0, 1, 2, 4):  # chunk 3 never written
            d[t] = x[t]
        d.id.write_direct_chunk((5, 0, 0), x[4].tobytes())  # beyond the extent
        f["utts/u/labels"] = np.array([1, 2])
    one_line_error(invoke("score", path), path, "utterance u", "only 4 of its 5 chunks")


@pytest.mark.parametrize("how", ["gzip short", "lzf short", "raw short", "gzip garbage"])
def test_chunks_that_decode_short_are_refused(tmp_path, how):
    # HDF5 leaves the rest of a short chunk's buffer uninitialised: numbers that changed
    # from run to run.
    import zlib

    x = np.full((4, 3, 8), 2.0, np.float32)
    x[..., 1] = 5.0
    path = tmp_path / "short.h5"
    comp = {"gzip short": "gzip", "gzip garbage": "gzip", "lzf short": "lzf"}.get(how)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("utts/u/logits", shape=x.shape, chunks=(1, 3, 8), dtype=np.float32,
                             compression=comp)
        for t in range(4):
            r = x[t].tobytes()
            if t != 2:
                d[t] = x[t]
            elif how == "gzip short":
                d.id.write_direct_chunk((t, 0, 0), zlib.compress(r[: len(r) // 2]))
            elif how == "gzip garbage":
                d.id.write_direct_chunk((t, 0, 0), b"not deflate at all")
            elif how == "lzf short":
                # a valid LZF stream of two literal runs: 32 + 16 = 48 of the 96 bytes
                d.id.write_direct_chunk((t, 0, 0), bytes([31]) + r[:32] + bytes([15]) + r[32:48])
            else:
                d.id.write_direct_chunk((t, 0, 0), r[: len(r) // 2])
        f["utts/u/labels"] = np.array([1, 2])
    for args in ((), ("--via-hdf5",)):
        line = one_line_error(invoke("score", path, *args), path, "utterance u")
        want = {"raw short": "holds 48 bytes, not 96", "gzip garbage": "does not decode"}
        assert want.get(how, "decodes to 48 bytes, not 96") in line, line


def test_compressed_dumps_written_by_the_writer_still_read(tmp_path):
    for comp in ("gzip", "lzf"):
        path, _ = plain(tmp_path, f"{comp}.h5", n=3, compression=comp)
        raw, _ = plain(tmp_path, f"raw-{comp}.h5", n=3)
        assert losses(path) == losses(raw)


def test_a_file_that_crashes_hdf5_is_one_line(tmp_path):
    # A group B-tree node that points to itself: HDF5 recurses until it segfaults.
    import struct

    path = tmp_path / "bt.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("utts/u")
        g["logits"] = np.zeros((3, 2, 4), np.float32)
        g["labels"] = [1]
    raw = bytearray(path.read_bytes())
    p = raw.find(b"TREE")
    raw[p + 5] = 1
    struct.pack_into("<Q", raw, p + 32, p)
    path.write_bytes(bytes(raw))
    for cmd in ("score", "inspect", "align"):
        out = run_cli(cmd, path, timeout=60)
        # One line, exit 2: "the HDF5 library crashed (SIGSEGV)" with the HDF5 built into
        # today's h5py wheel; an HDF5 that catches the loop itself says "unreadable".
        one_line_error(out, path)
        assert "crashed" in out.stderr or "unreadable" in out.stderr, out.stderr


def test_labels_are_checked_against_memory_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "lab.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("utts/u")
        g.create_dataset("logits", data=np.zeros((2, 3001, 3), np.float32))
        g.create_dataset("labels", data=np.ones(3000, np.int64), compression="gzip")
    import rnntool.reader as reader

    monkeypatch.setattr(reader, "available_memory", lambda: 20_000)
    one_line_error(invoke("score", path), path, "utterance u: its labels would need")


def test_utt_lists_that_are_not_lists(tmp_path):
    path, _ = plain(tmp_path, n=1)
    bad = tmp_path / "ids.txt"
    bad.write_bytes(b"u0\n\xff\xfe\n")
    one_line_error(invoke("score", path, "--utt-list", bad), "ids.txt: line 2 is not UTF-8")
    one_line_error(run_cli("score", path, "--utt-list", "/dev/zero", timeout=60), "/dev/zero",
                 "longer than 1 MiB")


def test_dev_stdout_appends_where_the_shell_points_it(tmp_path):
    # The kind, found again: -o /dev/stdout with stdout appended to a log file
    # replaced the log (the link was followed to the file and renamed over).
    path, _ = plain(tmp_path, n=2)
    log = tmp_path / "log.txt"
    log.write_text("old\n")
    with open(log, "a") as f:
        out = subprocess.run([sys.executable, "-m", "rnntool", "score", str(path), "-q", "-o",
                              "/dev/stdout"], stdout=f, stderr=subprocess.PIPE, text=True,
                             timeout=60)
        f.write("after\n")
    assert out.returncode == 0, out.stderr
    lines = log.read_text().splitlines()
    assert lines[0] == "old" and lines[1].startswith("utt_id\t") and lines[-1] == "after"


def test_plot_never_replaces_an_input(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    dump, _ = plain(d, "u0.png", n=1)  # a dump named like the PNG plot would write
    before = dump.read_bytes()
    result = invoke("plot", dump, "--out-dir", d)
    assert result.exit_code == 2 and "is also an input" in result.stderr, result.output
    assert dump.read_bytes() == before


def test_output_may_not_replace_a_file_an_external_link_reads(tmp_path):
    target, _ = plain(tmp_path, "other.h5", n=1)
    main, _ = plain(tmp_path, "main.h5", n=1)
    with h5py.File(main, "a") as f:
        f["utts"]["x"] = h5py.ExternalLink("other.h5", "/utts/u0")
    before = target.read_bytes()
    one_line_error(invoke("score", main, "-o", target), "other.h5", "is also an input")
    assert target.read_bytes() == before


def test_grad_check_failure_lines_name_the_file_and_stay_one_line(tmp_path):
    path, (x, y, T, U) = plain(tmp_path, n=1)
    name = "x\nrnntool: fake line \x1b[2J"
    with h5py.File(path, "a") as f:
        g = f["utts"].create_group(name)
        g["logits"] = f["utts"]["u0"]["logits"][()]
        g["labels"] = f["utts"]["u0"]["labels"][()]
        g["grads"] = np.ones_like(g["logits"][()])
    result = invoke("grad-check", path, "--utt", name, "-q", "--samples", "2")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines and all(ln.startswith(f"rnntool: {path}: utterance x\\n") for ln in lines)
    assert "\x1b" not in result.stderr
    one_line_error(invoke("grad-check", path, "--rtol", "nan"), "must be finite")


def test_hdf5_must_parse_the_file_that_was_opened(tmp_path, monkeypatch):
    # A swap between our open() and HDF5's: HDF5 would parse one file while raw reads
    # come from the other.
    path, _ = plain(tmp_path, n=1)
    other, _ = plain(tmp_path, "other.h5", n=1, seed=9)
    real = h5py.File
    monkeypatch.setattr(h5py, "File", lambda p, mode="r", **kw: real(other, mode, **kw))
    with pytest.raises(DumpError, match="changed while being opened"):
        DumpReader(path)


def test_dev_stdout_appending_to_an_input_is_refused(tmp_path):
    path, _ = plain(tmp_path, n=1)
    before = path.read_bytes()
    with open(path, "a") as f:
        out = subprocess.run([sys.executable, "-m", "rnntool", "score", str(path), "-q", "-o",
                              "/dev/stdout"], stdout=f, stderr=subprocess.PIPE, text=True,
                             timeout=60)
    assert out.returncode == 2 and "is also an input" in out.stderr, out.stderr
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- lattice dumps
def lattice_utt(T, U, seed=0, dtype=np.float32, level=-0.5):
    """A lattice utterance's datasets (for write_lattice_raw): constant log-probs."""
    rng = np.random.default_rng(seed)
    return {"blank_lp": np.full((T, U + 1), level, dtype),
            "emit_lp": np.full((T, U), 2 * level, dtype),
            "log_p2_others": np.full((T, U + 1), max(4 * level, -1e38), dtype),
            "labels": rng.integers(1, 5, U)}


def capped_preadv(monkeypatch, cap=100):
    """Make os.preadv read at most ``cap`` bytes a call, as Linux does beyond about
    2 GiB (MAX_RW_COUNT) whatever is asked; returns the list of calls' byte counts."""
    real = os.preadv
    calls = []

    def preadv(fd, buffers, offset):
        cut, left = [], cap
        for b in buffers:
            b = memoryview(b).cast("B")
            if left <= 0:
                break
            cut.append(b[:left])
            left -= min(left, b.nbytes)
        got = real(fd, cut, offset)
        calls.append(got)
        return got

    monkeypatch.setattr(os, "preadv", preadv)
    return calls


@pytest.mark.parametrize("kind", ["full", "lattice"])
def test_raw_reads_go_on_after_a_short_read_that_is_not_the_end(tmp_path, monkeypatch, kind):
    # Linux reads at most 0x7ffff000 bytes per preadv call: an utterance of more than
    # 2 GiB stored raw was "the file ends inside its logits/blank_lp" (of a file that
    # did not end there). Simulated here with a cap of 100 bytes a call.
    path = tmp_path / "d.h5"
    if kind == "full":
        path, _ = plain(tmp_path, n=3)
    else:
        write_lattice_raw(path, {f"u{i}": lattice_utt(7, 4, seed=i, level=-0.1 * (i + 1))
                                 for i in range(3)})
    with DumpReader(path, direct=False) as r:
        want = {row["utt_id"]: row["loss"] for row in score_reader(r, r.utt_ids)}
    calls = capped_preadv(monkeypatch)
    with DumpReader(path) as r:
        got = {row["utt_id"]: row["loss"] for row in score_reader(r, r.utt_ids)}
        assert r._direct_ok  # really read with preadv, in more calls than one per array
    assert got == want and max(calls) == 100 and len(calls) > 3
    # The end of the file is still the end: a region past it is a short read.
    from rnntool.storage import RawRegion, ShortRead

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.path.getsize(path)
        dest = np.empty((1, 2, 50), np.float32)
        assert RawRegion(size - 220, (1, 2, 50)).read_into(fd, dest, 4) == \
            ShortRead(220, 400, size - 220)
    finally:
        os.close(fd)


def test_lattice_batches_pad_to_what_fits_not_to_the_longest_t_times_longest_u(
        tmp_path, monkeypatch):
    # Read in input order, a batch was padded to its longest T and its longest U: T =
    # 200000, U = 0 beside T = 1, U = 200000 (2.4 MB each) asked for 298 GiB (a
    # MemoryError traceback, or with overcommit a 10^10-node allocation).
    import rnntool.score as score
    path = tmp_path / "lat.h5"
    N = 20000
    write_lattice_raw(path, {"a": lattice_utt(N, 0), "b": lattice_utt(1, N, 1),
                             "c": lattice_utt(3, 2, 2), "d": lattice_utt(N, 0, 3)})
    padded = []
    real = score._pad_lattices

    def spy(lats, dtype):
        out = real(lats, dtype)
        padded.append(out[0].nbytes + out[1].nbytes)
        return out

    monkeypatch.setattr(score, "_pad_lattices", spy)
    result = invoke("score", path, "-q", "-f", "tsv")
    assert result.exit_code == 0, result.stderr
    rows = {r["utt_id"]: float(r["loss"]) for r in rows_of(result.stdout)}
    assert rows["a"] == pytest.approx(N * 0.5) and rows["b"] == pytest.approx(N * 1.0 + 0.5)
    assert rows["d"] == rows["a"] and len(rows) == 4
    assert max(padded) <= score.LATTICE_BATCH_BYTES  # each batch within the budget
    # The same numbers when every utterance is alone (the carried one is not lost).
    with DumpReader(path) as r:
        alone = {row["utt_id"]: row["loss"] for row in score_reader(r, r.utt_ids,
                                                                     budget_bytes=1)}
    assert alone == pytest.approx(rows)


def test_lattice_losses_beyond_float32_are_inf_without_a_raw_warning(tmp_path):
    # log-probs of -1e38: the float64 loss (6e38) rounds to inf in float32. The row's
    # own line says so; numpy's "overflow encountered in cast" was a second line.
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"a": lattice_utt(4, 2, level=-1e38), "b": lattice_utt(3, 1)})
    full = tmp_path / "full.h5"
    with DumpWriter(full, blank=0, input_kind="log_probs") as w:
        w.add("a", np.full((4, 3, 5), -1e38, np.float32), [1, 2])
    for p in (path, full):
        result = invoke("score", p, "-q", "-f", "tsv")
        assert result.exit_code == 1
        assert result.stderr.strip().splitlines() == [
            f"rnntool: {p}: utterance a: loss is inf (no alignment has non-zero probability)"]
        assert rows_of(result.stdout)[0]["loss"] == "inf"


def test_lattice_memory_message_reads_as_a_sentence(tmp_path, monkeypatch):
    import rnntool.reader as reader
    path = tmp_path / "lat.h5"
    write_lattice_raw(path, {"a": lattice_utt(4, 2)})
    monkeypatch.setattr(reader, "available_memory", lambda: 100)
    one_line_error(invoke("score", path), path, "utterance a: its lattice would need")


def test_compact_writes_an_id_selected_twice_once(tmp_path):
    # The writer refused the second copy ("utterance 'u1' was already added") after
    # the first batches were written; the CLI dedupes --utt, the library did not.
    from rnntool.compact import compact_dump, lattice_writer_for

    path, _ = plain(tmp_path, n=3)
    out = tmp_path / "lat.h5"
    with DumpReader(path) as r, lattice_writer_for(r, out) as w:
        assert compact_dump(r, ["u1", "u0", "u1"], w, budget_bytes=1) == 2
    with DumpReader(out) as r:
        assert sorted(r.utt_ids) == ["u0", "u1"]
    assert losses(out) == {k: v for k, v in losses(path).items() if k in ("u0", "u1")}


def test_every_lookup_of_an_utterance_checks_its_external_link(tmp_path):
    # has_stored_loss (which picks score's columns before anything is read) looked the
    # group up with h5py directly: an external link to a FIFO hung score for ever
    # (SIGTERM too: HDF5 sits in open()). In a child process, so a hang is a failure.
    path, _ = plain(tmp_path, n=1)
    os.mkfifo(tmp_path / "fifo.h5")
    with h5py.File(path, "a") as f:
        f["utts"]["f"] = h5py.ExternalLink(str(tmp_path / "fifo.h5"), "/x")
        f["utts"]["z"] = h5py.ExternalLink("/dev/zero", "/x")
        f["utts"]["u0"].attrs["loss"] = 1.5
    code = ("import sys; from rnntool.reader import DumpReader\n"
            "with DumpReader(sys.argv[1]) as r:\n"
            "    print([r.has_stored_loss(u) for u in ('u0', 'f', 'z', 'nope')])")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[True, False, False, False]", \
        out.stderr
