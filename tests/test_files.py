"""rnntool.files: output targets and the one atomic replace shared by open_output,
atomic_file and DumpWriter."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnntool import cleanup, files, output
from rnntool.dump import DumpWriteError, DumpWriter
from rnntool.files import (
    OutputError,
    check_replaceable,
    creation_mode,
    fd_alias,
    finish_temp,
    replacing,
    resolve_target,
)


def temps(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if p.name.startswith(".rnntool-"))


def new_temp(directory, data: bytes) -> tuple[int, str]:
    fd, tmp = cleanup.create_temp(str(directory), ".part")
    os.write(fd, data)
    return fd, tmp


# --------------------------------------------------------------------------- finish_temp
def test_finish_temp_renames_onto_the_target_with_its_mode(tmp_path):
    dest = tmp_path / "out"
    dest.write_bytes(b"old")
    dest.chmod(0o604)
    fd, tmp = new_temp(tmp_path, b"new")
    closed = []
    finish_temp(fd, tmp, str(dest), 0o604, close=lambda: closed.append(os.close(fd)))
    cleanup.unregister(tmp)
    assert dest.read_bytes() == b"new" and stat.S_IMODE(dest.stat().st_mode) == 0o604
    assert closed and not os.path.exists(tmp) and temps(tmp_path) == []


def test_finish_temp_gives_a_new_file_the_creation_mode(tmp_path):
    dest = tmp_path / "out"
    old = os.umask(0o027)
    try:
        fd, tmp = new_temp(tmp_path, b"x")
        finish_temp(fd, tmp, str(dest), None)
        os.close(fd)
        cleanup.unregister(tmp)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o640


def test_finish_temp_never_renames_over_what_is_not_a_file(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    fd, tmp = new_temp(tmp_path, b"x")
    with pytest.raises(OutputError, match=r"^shown: is now a directory; refusing to replace it$"):
        finish_temp(fd, tmp, str(dest), None, name="shown")
    assert os.path.exists(tmp) and dest.is_dir()  # the caller discards it
    os.close(fd)
    cleanup.discard(tmp)


# --------------------------------------------------------------------------- replacing
def test_replacing_writes_the_target_whole(tmp_path):
    dest = tmp_path / "out.bin"
    with replacing(str(dest), None, file_mode="wb") as f:
        f.write(b"abc")
        assert not dest.exists() and len(temps(tmp_path)) == 1
        assert cleanup.registered() == [str(tmp_path / temps(tmp_path)[0])]
    assert dest.read_bytes() == b"abc" and temps(tmp_path) == [] and cleanup.registered() == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(),
                                 cleanup.Terminated(15), OSError(errno.EIO, "own")])
def test_replacing_removes_the_temp_on_failure_and_keeps_the_exception(tmp_path, exc):
    dest = tmp_path / "out.txt"
    dest.write_text("old\n")
    with pytest.raises(type(exc)) as e, replacing(str(dest), None) as f:
        f.write("partial\n")
        raise exc
    assert e.value is exc  # unchanged, OSError included: only replacing's own are worded
    assert dest.read_text() == "old\n" and temps(tmp_path) == [] and cleanup.registered() == []


@pytest.mark.parametrize("call", ["fsync", "fchmod", "replace"])
def test_replacing_words_a_failure_to_finish(tmp_path, monkeypatch, call):
    dest = tmp_path / "out.txt"
    dest.write_text("old\n")

    def fail(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputError) as e, replacing(str(dest), None, name="-o out.txt") as f:
        f.write("new\n")
        monkeypatch.setattr(os, call, fail)
    monkeypatch.undo()
    assert str(e.value) == "-o out.txt: cannot write (No space left on device)"
    assert dest.read_text() == "old\n" and temps(tmp_path) == []


def test_replacing_a_link_follows_the_links_flag(tmp_path):
    target = tmp_path / "target"
    target.write_text("kept\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(OutputError, match="is now a symbolic link"), \
            replacing(str(link), None) as f:
        f.write("x")
    with replacing(str(link), None, links=True) as f:
        f.write("new\n")
    assert not link.is_symlink() and link.read_text() == "new\n"
    assert target.read_text() == "kept\n" and temps(tmp_path) == []


def test_replacing_in_a_missing_directory_is_one_line(tmp_path):
    missing = str(tmp_path / "no" / "out")
    with pytest.raises(OutputError, match=r"^x: cannot write \(No such file or directory\)$"), \
            replacing(missing, None, name="x"):
        pass


# --------------------------------------------------------------------------- every writer uses it
def test_every_writer_refuses_a_target_swapped_for_a_directory_alike(tmp_path):
    messages = []
    dest = tmp_path / "a"
    with pytest.raises(OutputError) as e, output.open_output(str(dest)) as f:
        f.write("x")
        dest.mkdir()
    messages.append(str(e.value).replace(str(dest), "DEST"))
    dest = tmp_path / "b"
    with pytest.raises(OutputError) as e, output.atomic_file(dest) as f:
        f.write(b"x")
        dest.mkdir()
    messages.append(str(e.value).replace(str(dest), "DEST"))
    dest = tmp_path / "c.h5"
    w = DumpWriter(dest)
    w.add("u", np.zeros((2, 2, 3), np.float32), [1])
    dest.mkdir()
    with pytest.raises(DumpWriteError) as e:
        w.close()
    messages.append(str(e.value).replace(str(dest), "DEST"))
    assert messages == ["DEST: is now a directory; refusing to replace it"] * 3
    assert temps(tmp_path) == []


# --------------------------------------------------------------------------- targets
def test_resolve_target_rules(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    f.chmod(0o640)
    t = resolve_target(str(f))
    assert (t.path, t.stream, t.mode, t.fd) == (str(f), False, 0o640, None)
    link = tmp_path / "link"
    link.symlink_to(f)
    assert resolve_target(str(link)).path == str(f)
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    with pytest.raises(OutputError, match="dangling symbolic link"):
        resolve_target(str(tmp_path / "dangling"))
    with pytest.raises(OutputError, match="is a directory"):
        resolve_target(str(tmp_path))
    with pytest.raises(OutputError, match="is also an input"):
        resolve_target(str(link), [str(f)])
    assert resolve_target(str(tmp_path / "new")).mode is None
    assert resolve_target("/dev/null").stream
    with pytest.raises(OutputError, match="not a regular file"):
        resolve_target("/dev/null", streams=False)
    with pytest.raises(OutputError, match="names the file descriptor 1"):
        resolve_target("/dev/stdout", streams=False)
    assert resolve_target("/dev/stdout").fd == 1


def test_fd_alias():
    assert fd_alias("/dev/stdout") == 1 and fd_alias("/dev/fd/7") == 7
    assert fd_alias("/proc/self/fd/3") == 3 and fd_alias("/tmp/x") is None
    other = 1 if os.getpid() != 1 else 2
    with pytest.raises(OutputError, match="another process's file descriptor"):
        fd_alias(f"/proc/{other}/fd/1")


def test_check_replaceable(tmp_path):
    check_replaceable(str(tmp_path / "absent"))
    (tmp_path / "f").write_text("x")
    check_replaceable(str(tmp_path / "f"))
    (tmp_path / "l").symlink_to(tmp_path / "f")
    check_replaceable(str(tmp_path / "l"), links=True)
    with pytest.raises(OutputError, match=r"^shown: is now a symbolic link"):
        check_replaceable(str(tmp_path / "l"), "shown")


def test_creation_mode_follows_the_umask():
    old = os.umask(0o077)
    try:
        assert creation_mode() == 0o600 and files.umask() == 0o077
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- layering
def test_output_reexports_what_moved():
    for name in ("OutputError", "Target", "resolve_target", "fd_alias", "check_replaceable",
                 "creation_mode", "umask", "resolve_target_inputs"):
        assert getattr(output, name) is getattr(files, name), name


def test_the_io_layer_does_not_import_the_output_layer():
    code = ("import sys, rnntool.dump, rnntool.reader, rnntool.files; "
            "print([m for m in ('rnntool.output', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
