"""Outputs in hostile places (issue 9, writer side): never a write outside the target,
never a half file, never a crash.

``-o`` targets that are inputs, links, FIFOs, devices, sockets or directories;
file names made from hostile utterance ids; a full disk under ``open_output``
and ``DumpWriter``; SIGINT/SIGTERM while a temporary file exists; the console
script's start-up.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import pytest

from rnntool import cleanup
from rnntool.dump import DumpReader, DumpWriteError, DumpWriter
from rnntool.output import (
    OutputError,
    atomic_file,
    check_writable,
    confined_name,
    creation_mode,
    open_output,
    resolve_target,
)

ROOT = Path(__file__).resolve().parents[1]
X = np.zeros((3, 3, 5), np.float32)
Y = np.array([1, 2])


def leftovers(*dirs) -> list[str]:
    """Temporary files rnntool may have left in ``dirs``."""
    return [str(p) for d in dirs for p in Path(d).iterdir()
            if p.name.startswith(".rnntool-") or p.name.endswith(".part")]


def write_rows(output, inputs=(), text="a\tb\n"):
    with open_output(None if output is None else str(output),
                     [str(i) for i in inputs]) as out:
        out.write(text)


def small_dump(path, n=2):
    with DumpWriter(path) as w:
        for i in range(n):
            w.add(f"u{i}", X, Y)
    return path


@pytest.fixture(autouse=True)
def _registry_empty():
    yield
    assert cleanup.registered() == [], "a temporary file stayed registered"


# --------------------------------------------------------------------------- open_output
def test_stdout_for_none_and_dash(capsys):
    write_rows(None, text="x\n")
    write_rows("-", text="y\n")
    assert capsys.readouterr().out == "x\ny\n"


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "relative path"])
def test_output_that_is_an_input_is_refused(tmp_path, how, monkeypatch):
    dump = small_dump(tmp_path / "d.h5")
    before = dump.read_bytes()
    out = {"same path": dump, "relative path": Path("d.h5")}.get(how, tmp_path / "alias")
    if how == "symlink":
        out.symlink_to(dump)
    elif how == "hard link":
        os.link(dump, out)
    monkeypatch.chdir(tmp_path)
    for check in (lambda: check_writable(str(out), [str(dump)]), lambda: write_rows(out, [dump])):
        with pytest.raises(OutputError, match=r"is also an input.*refusing to overwrite") as e:
            check()
        assert str(e.value).startswith(f"{out}: ") and "\n" not in str(e.value)
    assert dump.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_char_device_is_written_in_place(tmp_path):
    write_rows("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_full_device_is_an_output_error():
    with pytest.raises(OutputError, match=r"^/dev/full: cannot write \(No space left on device\)$"):
        write_rows("/dev/full", text="x" * 100_000)


def test_fifo_is_written_as_a_stream(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    write_rows(fifo, text="row\n" * 10_000)  # more than a pipe buffer
    reader.join(5)
    assert got == [b"row\n" * 10_000]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert leftovers(tmp_path) == []


def test_socket_is_refused(tmp_path):
    path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        with pytest.raises(OutputError, match=r"sock: is a socket; refusing to write to it$"):
            write_rows(path)
        with pytest.raises(OutputError, match="is a socket"):
            check_writable(str(path))
    finally:
        s.close()
    assert leftovers(tmp_path) == []


def test_symlink_is_followed_and_stays_a_link(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    target = real_dir / "scores.tsv"
    target.write_text("old\n")
    target.chmod(0o640)
    link = tmp_path / "link.tsv"
    link.symlink_to(target)
    chain = tmp_path / "chain.tsv"
    chain.symlink_to(link)
    write_rows(chain, text="new\n")
    assert chain.is_symlink() and link.is_symlink()
    assert os.readlink(link) == str(target)
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert resolve_target(str(chain)).path == str(target)
    assert leftovers(tmp_path, real_dir) == []


def test_dangling_symlink_is_refused(tmp_path):
    link = tmp_path / "out.tsv"
    link.symlink_to(tmp_path / "elsewhere" / "nothing.tsv")
    for check in (lambda: check_writable(str(link)), lambda: write_rows(link)):
        with pytest.raises(OutputError, match=r"out.tsv: is a dangling symbolic link"):
            check()
    assert not (tmp_path / "elsewhere").exists()
    assert link.is_symlink() and leftovers(tmp_path) == []


def test_symlink_loop_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OutputError, match=r"a: cannot write \(Too many levels of symbolic links\)"):
        write_rows(a)


@pytest.mark.parametrize("name, message", [
    ("dir", "is a directory"),
    ("dir/", "is a directory"),
    ("new/", "is not a file name"),
    ("missing/x.tsv", "does not exist"),
    ("file.txt/x", "cannot write (Not a directory)"),
    ("", "empty"),
])
def test_paths_that_are_not_files_are_refused(tmp_path, name, message):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file.txt").write_text("keep\n")
    out = str(tmp_path / name) + ("/" if name.endswith("/") else "") if name else ""
    with pytest.raises(OutputError, match=re.escape(message)):
        check_writable(out)
    with pytest.raises(OutputError, match=re.escape(message)):
        write_rows(out)
    assert not (tmp_path / "new").exists() and (tmp_path / "file.txt").read_text() == "keep\n"
    assert leftovers(tmp_path, tmp_path / "dir") == []


@pytest.mark.parametrize("swap", ["fifo", "directory", "symlink"])
def test_destination_changed_while_writing_is_not_replaced(tmp_path, swap):
    out = tmp_path / "out.tsv"
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    with pytest.raises(OutputError, match=r"out.tsv: is now a .*refusing to replace it"), \
            open_output(str(out)) as f:
        f.write("rows\n")
        if swap == "fifo":
            os.mkfifo(out)
        elif swap == "directory":
            out.mkdir()
        else:
            out.symlink_to(victim)
    assert victim.read_text() == "precious\n"
    kind = {"fifo": stat.S_ISFIFO, "directory": stat.S_ISDIR, "symlink": stat.S_ISLNK}[swap]
    assert kind(os.lstat(out).st_mode)
    assert leftovers(tmp_path) == []


def test_permissions_kept_or_from_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert creation_mode() == 0o640
        new = tmp_path / "new.tsv"
        write_rows(new)
        assert stat.S_IMODE(new.stat().st_mode) == 0o640
        existing = tmp_path / "existing.tsv"
        existing.write_text("old\n")
        existing.chmod(0o604)
        write_rows(existing)
        assert stat.S_IMODE(existing.stat().st_mode) == 0o604
    finally:
        os.umask(old)


@pytest.mark.parametrize("call, err", [("fsync", errno.EIO), ("replace", errno.ENOSPC),
                                       ("write", errno.EFBIG)])
def test_io_errors_become_one_line_naming_the_file(tmp_path, monkeypatch, call, err):
    out = tmp_path / "out.tsv"
    out.write_text("old\n")

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    if call == "write":
        with pytest.raises(OutputError) as e, open_output(str(out)) as f:
            monkeypatch.setattr(f, "_f", type("F", (), {"write": fail, "flush": fail})())
            f.write("rows\n")
        monkeypatch.undo()
    else:
        monkeypatch.setattr(os, call, fail)
        with pytest.raises(OutputError) as e:
            write_rows(out)
        monkeypatch.undo()
    assert str(e.value) == f"{out}: cannot write ({os.strerror(err)})"
    assert out.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_errors_of_the_block_remove_the_temp_and_propagate_unchanged(tmp_path):
    out = tmp_path / "out.tsv"
    for exc in (RuntimeError("boom"), KeyboardInterrupt(), cleanup.Terminated(15),
                FileNotFoundError(errno.ENOENT, "input gone")):
        with pytest.raises(type(exc)), open_output(str(out)) as f:
            f.write("partial\n")
            assert len(cleanup.registered()) == 1
            assert Path(cleanup.registered()[0]).parent == tmp_path
            raise exc
        assert not out.exists() and leftovers(tmp_path) == []


def test_rich_table_through_the_guarded_stream(tmp_path):
    from rnntool.output import render

    out = tmp_path / "t.txt"
    with open_output(str(out)) as f:
        render([{"utt_id": "u1", "loss": 1.5}], ["utt_id", "loss"], "table", f)
    assert "u1" in out.read_text() and "1.500000" in out.read_text()


RLIMIT_OUTPUT = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from rnntool.output import OutputError, open_output
try:
    with open_output("out.tsv") as f:
        for i in range(100_000):
            f.write(f"utt{i}\\t{i}\\n")
except OutputError as e:
    print(e)
    sys.exit(2)
"""


def test_file_size_limit_under_open_output(tmp_path):
    r = subprocess.run([sys.executable, "-c", RLIMIT_OUTPUT], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stdout == "out.tsv: cannot write (File too large)\n"
    assert r.stderr == ""
    assert not (tmp_path / "out.tsv").exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------- atomic_file
def test_atomic_file_writes_and_replaces(tmp_path):
    dest = tmp_path / "a.png"
    with atomic_file(dest) as f:
        f.write(b"one")
    assert dest.read_bytes() == b"one"
    dest.chmod(0o600)
    with atomic_file(dest) as f:
        f.write(b"two")
    assert dest.read_bytes() == b"two" and stat.S_IMODE(dest.stat().st_mode) == 0o600
    with pytest.raises(ZeroDivisionError), atomic_file(dest) as f:
        f.write(b"three")
        1 / 0  # noqa: B018
    assert dest.read_bytes() == b"two" and leftovers(tmp_path) == []


def test_atomic_file_replaces_a_planted_symlink_never_writes_through_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out_dir = tmp_path / "plots"
    out_dir.mkdir()
    planted = out_dir / "u1.png"
    planted.symlink_to(victim)
    with atomic_file(planted) as f:
        f.write(b"png")
    assert not planted.is_symlink() and planted.read_bytes() == b"png"
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket"])
def test_atomic_file_refuses_special_destinations(tmp_path, kind):
    dest = tmp_path / "u1.png"
    s = None
    if kind == "fifo":
        os.mkfifo(dest)
    elif kind == "directory":
        dest.mkdir()
    else:
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(dest))
    try:
        with pytest.raises(OutputError, match=r"u1.png: is a .*; refusing to replace it$"), \
                atomic_file(dest) as f:
            f.write(b"x")
    finally:
        if s is not None:
            s.close()
    assert not dest.is_file() and leftovers(tmp_path) == []


def test_atomic_file_destination_swapped_before_rename(tmp_path):
    dest = tmp_path / "u1.png"
    with pytest.raises(OutputError, match="is now a directory"), atomic_file(dest) as f:
        f.write(b"x")
        dest.mkdir()
    assert dest.is_dir() and leftovers(tmp_path) == []


def test_atomic_file_write_error_names_the_destination(tmp_path):
    dest = tmp_path / "u1.png"
    with pytest.raises(OutputError, match=r"u1.png: cannot write \(No space left on device\)"), \
            atomic_file(dest):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not dest.exists() and leftovers(tmp_path) == []


def test_plot_utterance_into_atomic_file(tmp_path):
    pytest.importorskip("matplotlib")
    from rnntool.plots import plot_utterance

    dest = tmp_path / confined_name("../evil", ".png")
    occ = np.full((3, 2), 0.5)
    with atomic_file(dest) as f:
        plot_utterance(f, utt_id="../evil", loss=1.0, best_log_prob=-1.0, occupancy=occ,
                       best_path=np.array([[0, 0], [1, 0], [2, 1]]), grad_norm=occ)
    assert dest.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["%2E.%2Fevil.png"]


# --------------------------------------------------------------------------- confined_name
HOSTILE_IDS = [
    "/../../../../tmp/x", "..", ".", "...", ".hidden", "a/b", "a\\b", "a\nb", "a\x00b", "con",
    "x" * 1000, "é" * 300, "", " ", "%2F", "/", "%", "%25", "a b", "a+b", "a-b", "a_b", "a.b",
    "é", "%C3%A9", "\udcff", "~", "x" * 240 + "~0123456789abcdef", "-rf", "*", "?",
]


def _decode(stem: str) -> bytes:
    return b"" if stem == "%" else urllib.parse.unquote_to_bytes(stem)


@pytest.mark.parametrize("utt_id", HOSTILE_IDS, ids=[repr(u)[:30] for u in HOSTILE_IDS])
def test_confined_name_stays_in_its_directory(tmp_path, utt_id):
    name = confined_name(utt_id, ".png")
    assert re.fullmatch(r"[A-Za-z0-9._+%~-]+", name), name
    assert not name.startswith(".") and name not in (".", "..")
    assert len(name.encode()) <= 255 and name.endswith(".png")
    assert all(re.fullmatch(r"[0-9A-F]{2}", name[i + 1:i + 3]) for i, c in enumerate(name)
               if c == "%" and utt_id != "")
    with atomic_file(tmp_path / name) as f:
        f.write(b"x")
    assert [p.name for p in tmp_path.iterdir()] == [name]
    if "~" not in name:  # not truncated: the name decodes back to the id
        raw = utt_id.encode("utf-8", "surrogatepass")
        assert _decode(name[: -len(".png")]) == raw


def test_confined_names_never_collide():
    ids = HOSTILE_IDS + ["x" * 999 + "y", "x" * 999 + "z", "é" * 299 + "e", "a\rb", "a\tb"]
    names = [confined_name(u, ".png") for u in ids]
    assert len(set(names)) == len(ids)
    assert confined_name("%2F") != confined_name("/")
    assert confined_name("x" * 1000) != confined_name("x" * 1001)


def test_confined_name_examples():
    assert confined_name("spk1-07", ".png") == "spk1-07.png"
    assert confined_name("/../../../../tmp/x", ".png") == "%2F..%2F..%2F..%2F..%2Ftmp%2Fx.png"
    assert confined_name("..", ".png") == "%2E..png"
    assert confined_name("a\nb") == "a%0Ab"
    assert confined_name("%2F") == "%252F"
    assert confined_name("") == "%"
    long = confined_name("x" * 1000, ".png")
    assert len(long) == 255 and re.fullmatch(r"x+~[0-9a-f]{16}\.png", long)
    cut = confined_name("é" * 300, ".png")
    assert re.fullmatch(r"(%C3%A9)+~[0-9a-f]{16}\.png", cut)
    with pytest.raises(ValueError):
        confined_name("u", "/x")
    with pytest.raises(TypeError):
        confined_name(b"u")


def test_confined_name_is_injective_on_random_ids():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.text(max_size=120), st.text(max_size=120))
    def check(a, b):
        na, nb = confined_name(a, ".png"), confined_name(b, ".png")
        assert (na == nb) == (a == b)
        assert "/" not in na and not na.startswith(".")

    check()


# --------------------------------------------------------------------------- cleanup registry
def test_create_temp_registers_before_and_discard_forgets(tmp_path):
    fd, path = cleanup.create_temp(str(tmp_path), ".part")
    os.close(fd)
    assert path in cleanup.registered() and Path(path).name.startswith(".rnntool-")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    cleanup.discard(path)
    assert not os.path.exists(path) and path not in cleanup.registered()


def test_forked_child_never_removes_the_parents_files(tmp_path):
    fd, path = cleanup.create_temp(str(tmp_path), ".part")
    os.close(fd)
    try:
        pid = os.fork()
        if pid == 0:  # child: its registry is empty; a remove_all there removes nothing
            try:
                cleanup.remove_all()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert os.path.exists(path)
    finally:
        cleanup.discard(path)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_library_sigterm_handler_comes_and_goes(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("the test runner has its own SIGTERM handler")
    mine = lambda s, f: None  # noqa: E731
    fd, path = cleanup.create_temp(str(tmp_path), ".part")
    os.close(fd)
    try:
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    finally:
        cleanup.discard(path)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # A program's own handler is left alone.
    signal.signal(signal.SIGTERM, mine)
    try:
        fd, path = cleanup.create_temp(str(tmp_path), ".part")
        os.close(fd)
        assert signal.getsignal(signal.SIGTERM) is mine
        cleanup.discard(path)
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start(script: str, cwd) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line != "ready\n":
        p.kill()
        raise AssertionError(f"child not ready: {line!r} {p.communicate()[1]}")
    return p


DUMP_THEN_WAIT = """
import time, numpy as np
from rnntool.dump import DumpWriter
{open}
    w.add("u1", np.zeros((3, 3, 5), np.float32), np.array([1, 2]))
    print("ready", flush=True)
    time.sleep(30)
"""


@pytest.mark.parametrize("sig, how", [
    (signal.SIGTERM, "with"), (signal.SIGTERM, "bare"), (signal.SIGHUP, "bare"),
    (signal.SIGINT, "with"), (signal.SIGINT, "bare"),
])
def test_dump_writer_killed_by_a_signal_leaves_nothing(tmp_path, sig, how):
    opener = ('with DumpWriter("d.h5") as w:' if how == "with"
              else 'w = DumpWriter("d.h5")\nif True:')
    p = _start(DUMP_THEN_WAIT.format(open=opener), tmp_path)
    assert len(leftovers(tmp_path)) == 1
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert p.returncode == -sig, err  # still dies by that signal, as the program would have
    assert leftovers(tmp_path) == [] and not (tmp_path / "d.h5").exists()
    if sig != signal.SIGINT:
        assert err == ""


OUTPUT_UNDER_CLI_HANDLERS = """
import sys, time
from rnntool import cleanup
from rnntool.output import open_output
cleanup.install_cli_handlers(unwind={unwind})
try:
    with open_output("out.tsv") as f:
        f.write("partial\\n")
        print("ready", flush=True)
        time.sleep(30)
except cleanup.Terminated as e:
    print("rnntool: terminated", file=sys.stderr)
    sys.exit(e.exit_code)
except KeyboardInterrupt:
    print("rnntool: interrupted", file=sys.stderr)
    sys.exit(130)
"""


@pytest.mark.parametrize("unwind", [False, True], ids=["exit", "unwind"])
@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGHUP, 129, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_cli_handlers_exit_128_plus_signal(tmp_path, sig, code, line, unwind):
    p = _start(OUTPUT_UNDER_CLI_HANDLERS.format(unwind=unwind), tmp_path)
    p.send_signal(sig)
    _, err = p.communicate(timeout=20)
    assert p.returncode == code and err == f"rnntool: {line}\n"
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.tsv").exists()


SLOW_UNWIND = """
import time
from rnntool import cleanup
from rnntool.output import open_output
cleanup.install_cli_handlers(unwind=True)
try:
    with open_output("out.tsv") as f:
        print("ready", flush=True)
        time.sleep(30)
finally:
    print("unwinding", flush=True)
    time.sleep(30)  # a cleanup that hangs: a second signal must still end the run
"""


def test_unwind_mode_second_signal_exits_at_once(tmp_path):
    p = _start(SLOW_UNWIND, tmp_path)
    p.send_signal(signal.SIGTERM)
    assert p.stdout.readline() == "unwinding\n"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 143 and err == ""
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- DumpWriter
def test_dump_writer_refuses_what_is_not_a_regular_file(tmp_path):
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.h5")
    cases = {"dir": "is a directory", "fifo": "is a FIFO, not a regular file",
             "dangling": "is a dangling symbolic link", "/dev/null": "is a character device"}
    for name, message in cases.items():
        path = name if name.startswith("/") else str(tmp_path / name)
        with pytest.raises(DumpWriteError, match=re.escape(f"{path}: {message}")) as e:
            DumpWriter(path)
        assert isinstance(e.value, OSError)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert not (tmp_path / "nowhere.h5").exists() and leftovers(tmp_path) == []


def test_dump_writer_follows_a_symlink_and_keeps_permissions(tmp_path):
    real = small_dump(tmp_path / "real.h5", n=1)
    real.chmod(0o640)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    small_dump(link, n=3)
    assert link.is_symlink()
    with DumpReader(real) as r:
        assert len(r) == 3
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert leftovers(tmp_path) == []


def test_dump_file_has_no_reserved_tail(tmp_path):
    path = small_dump(tmp_path / "d.h5", n=5)
    with open(path, "rb") as f:
        head = f.read(64)
    assert head[8] == 0  # superblock version 0: end-of-file address at byte 40
    assert int.from_bytes(head[40:48], "little") == path.stat().st_size
    with h5py.File(path) as f:
        assert len(f["utts"]) == 5


@pytest.mark.parametrize("compression", [None, "gzip", "lzf"])
def test_reserved_room_covers_what_hdf5_uses(tmp_path, compression):
    rng = np.random.default_rng(0)
    with DumpWriter(tmp_path / "d.h5", compression=compression, vocab=["t"] * 7) as w:
        for i in range(300):
            T, U = int(rng.integers(1, 40)), int(rng.integers(0, 4))
            w.add("n" * (i % 150) + str(i), rng.standard_normal((T, U + 1, 7)),
                  rng.integers(1, 7, U), text="é" * int(rng.integers(0, 300)), loss=1.0,
                  grads=rng.standard_normal((T, U + 1, 7)) if i % 3 == 0 else None)
            assert w._f.id.get_filesize() <= w._reserved
        x = rng.standard_normal((3, 200, 6, 7)).astype(np.float32)
        w.add_batch(x, rng.integers(1, 7, (3, 5)), [200, 50, 1], [5, 2, 0])
        assert w._f.id.get_filesize() <= w._reserved


def test_no_space_finishes_the_writer(tmp_path, monkeypatch):
    path = tmp_path / "dev.h5"
    w = DumpWriter(path)
    w.add("u1", X, Y)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DumpWriteError) as e:
        w.add("u7", np.zeros((2000, 3, 5), np.float32), Y)
    assert str(e.value) == f"{path}: cannot write utterance 'u7' (No space left on device)"
    assert e.value.errno == errno.ENOSPC
    assert leftovers(tmp_path) == [] and not path.exists()
    with pytest.raises(ValueError, match="closed after an error"):
        w.add("u8", X, Y)
    with pytest.raises(ValueError, match="closed after an error"):
        w.add_batch(X[None], Y[None], [3], [2])
    with pytest.raises(ValueError, match="not written"):
        w.close()
    w.abort()  # nothing left to drop; does not raise
    # Inside `with`, the error propagates and __exit__ adds nothing.
    with pytest.raises(DumpWriteError), DumpWriter(tmp_path / "b.h5") as w2:
        w2.add_batch(np.zeros((2, 3, 3, 5), np.float32), np.ones((2, 2), int), [3, 3], [2, 2],
                     utt_ids=["b0", "b1"])
        monkeypatch.setattr(os, "posix_fallocate", full)
        w2.add_batch(np.zeros((2, 3000, 3, 5), np.float32), np.ones((2, 2), int), [3000, 3000],
                     [2, 2], utt_ids=["b2", "b3"])
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_close_io_error(tmp_path, monkeypatch, call):
    path = tmp_path / "dev.h5"
    path.write_bytes(b"old")

    def fail(*a, **k):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    w = DumpWriter(path)
    w.add("u1", X, Y)
    monkeypatch.setattr(os, call, fail)
    with pytest.raises(DumpWriteError, match=r"dev.h5: cannot write the dump \(Input/output error\)$"):
        w.close()
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_target_swapped_before_close_is_not_replaced(tmp_path):
    path = tmp_path / "dev.h5"
    w = DumpWriter(path)
    w.add("u1", X, Y)
    path.mkdir()
    with pytest.raises(DumpWriteError, match=r"dev.h5: is now a directory; refusing to replace"):
        w.close()
    assert path.is_dir() and leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_init_never_leaks_the_temp_file(tmp_path, monkeypatch, exc):
    def boom(*a, **k):
        raise exc(errno.EIO, "boom") if exc is OSError else exc()

    monkeypatch.setattr(h5py, "File", boom)
    with pytest.raises(exc):
        DumpWriter(tmp_path / "d.h5")
    monkeypatch.undo()
    assert leftovers(tmp_path) == []


def test_init_reservation_failure(tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DumpWriteError, match=r"d.h5: cannot write \(No space left on device\)"):
        DumpWriter(tmp_path / "d.h5")
    assert leftovers(tmp_path) == []


def test_validation_errors_keep_the_writer(tmp_path):
    path = tmp_path / "d.h5"
    with DumpWriter(path) as w:
        with pytest.raises(ValueError):
            w.add("u1", X, np.array([1]))
        with pytest.raises(OSError, match="too large") as e:  # HDF5 refuses: not I/O
            w.add("big", X, Y, note=np.zeros(100_000))
        assert e.value.errno is None and not isinstance(e.value, DumpWriteError)
        assert "big" not in w._utts
        w.add("u1", X, Y)
    with DumpReader(path) as r:
        assert r.utt_ids == ["u1"]


DISK_FULL = """
import resource, signal, sys
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from rnntool.dump import DumpWriter
if {unguarded}:  # as if the room reserved were not enough (or an EIO inside HDF5)
    DumpWriter._reserve = lambda self, extra: None
resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
rng = np.random.default_rng(0)
try:
    with DumpWriter("dev.h5") as w:
        for i in range(100):
            w.add(f"u{{i}}", rng.standard_normal((100, 10, 50)).astype(np.float32),
                  rng.integers(1, 50, 9))
except OSError as e:
    print(type(e).__name__, e.errno, e)
    sys.exit(3)
"""


@pytest.mark.parametrize("unguarded", [False, True], ids=["reserved", "inside-hdf5"])
def test_disk_full_in_a_subprocess(tmp_path, unguarded):
    r = subprocess.run([sys.executable, "-c", DISK_FULL.format(unguarded=unguarded)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr[-2000:]
    assert re.fullmatch(r"DumpWriteError 27 dev.h5: cannot write utterance 'u\d+' "
                        r"\(File too large\)\n", r.stdout), r.stdout
    assert r.stderr == ""  # no "Exception ignored", no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- console script
def _rnntool():
    exe = Path(sys.executable).with_name("rnntool")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "rnntool"]


def _wait_until_catching(pid: int, sig: int, timeout: float = 20.0) -> bool:
    """Wait until process ``pid`` catches ``sig`` (Linux: SigCgt in /proc/PID/status).

    The interpreter's own start-up (site, .pth files: ~25 ms here) runs before any
    rnntool code, and a SIGINT there is Python's KeyboardInterrupt traceback,
    which no program can prevent; so the delays count from the moment
    rnntool._entry has installed its handlers (SIGTERM caught)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        except (OSError, StopIteration):
            return False  # exited (or no /proc)
        if mask >> (sig - 1) & 1:
            return True
        time.sleep(0.001)
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_console_script_signal_at_any_moment(tmp_path, sig, delay):
    """No traceback and no temporary file whenever the signal comes after start-up:
    one line ("rnntool: interrupted"/"rnntool: terminated") or none (during start-up),
    exit 130/143, or 0 if the run finished first."""
    out = tmp_path / "out.tsv"
    p = subprocess.Popen([*_rnntool(), "score", str(ROOT / "sample_data" / "sample.h5"),
                          "-o", str(out), "-q", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_until_catching(p.pid, signal.SIGTERM)  # else a 0 exit would prove nothing
    time.sleep(delay)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert "Traceback" not in err and "Aborted" not in err, err
    # -sig: the signal came while the interpreter shut down, after the command had
    # finished (Python restores the default handlers then); the output is complete.
    assert p.returncode in (0, 128 + sig, -sig), (p.returncode, err)
    if p.returncode == -sig:
        assert out.exists()
    assert err in ("", "rnntool: interrupted\n", "rnntool: terminated\n"), err
    assert leftovers(tmp_path) == []
    # Whole or absent: a signal after the rename (exit 130/143, or -sig) finds it whole.
    assert not out.exists() or out.read_text().count("\n") == 25


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_python_dash_m_goes_through_the_same_entry(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "rnntool", "score",
                          str(ROOT / "sample_data" / "sample.h5"), "-o", str(tmp_path / "o.tsv"),
                          "-q", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_until_catching(p.pid, signal.SIGTERM)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode in (0, 143) and "Traceback" not in err
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------- the commands
def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rnntool", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("cmd", ["score", "align", "grad-check"])
def test_commands_refuse_to_overwrite_an_input(tmp_path, cmd):
    # The issue's example: `rnntool score d.h5 -o d.h5` overwrote the input with TSV.
    dump = small_dump(tmp_path / "d.h5")
    ids = tmp_path / "ids.txt"
    ids.write_text("u0\n")
    (tmp_path / "alias.h5").symlink_to(dump)
    before = dump.read_bytes(), ids.read_bytes()
    for out, extra in ((dump, ()), (tmp_path / "alias.h5", ()), (ids, ("--utt-list", ids))):
        r = _cli(cmd, dump, "-o", out, *extra)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and "is also an input" in err[0], r.stderr
    assert (dump.read_bytes(), ids.read_bytes()) == before
    assert os.path.islink(tmp_path / "alias.h5")
    assert leftovers(tmp_path) == []


def test_score_to_dev_null_and_a_fifo_leaves_them_special(tmp_path):
    dump = small_dump(tmp_path / "d.h5")
    r = _cli("score", dump, "-o", "/dev/null", "-q")
    assert r.returncode == 0, r.stderr
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "rows"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    r = _cli("score", dump, "-o", fifo, "-q", "-f", "tsv")
    reader.join(30)
    assert r.returncode == 0, r.stderr
    assert got and got[0].splitlines()[0].startswith("utt_id\t") and len(got[0].splitlines()) == 3
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_plot_out_dir_that_is_a_file_or_holds_planted_links(tmp_path):
    dump = small_dump(tmp_path / "d.h5")
    afile = tmp_path / "afile"
    afile.write_text("keep")
    r = _cli("plot", dump, "-d", afile)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert afile.read_text() == "keep"
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (out / "u0.png").symlink_to(victim)  # a link planted where a PNG will go
    r = _cli("plot", dump, "-d", out, "-q")
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "keep" and not os.path.islink(out / "u0.png")
    assert sorted(p.name for p in out.iterdir()) == ["u0.png", "u1.png"]
