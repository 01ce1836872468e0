"""Where an output may go, and the one way rnntool replaces a file.

The file-level rules every writer follows (``open_output``'s ``-o FILE``,
``atomic_file``'s PNGs, ``DumpWriter``'s dumps):

- ``resolve_target``: what an output name really is (symbolic links followed, a
  dangling one refused, directories, sockets and inputs refused, FIFOs and
  devices written in place, ``/dev/stdout`` and ``/dev/fd/N`` the descriptor);
- every new file is written to a temporary ``.rnntool-*.part`` beside its
  target (``rnntool.cleanup`` removes it on any failure or signal), then
  ``finish_temp`` gives it its permission bits, fsyncs it, checks once more
  that the target may be replaced (``check_replaceable``) and renames it
  onto the target; ``replacing`` is that whole sequence around a file object.

No rendering here, and no HDF5: output.py (rows, the CLI's streams) and dump.py
(the writer) both build on this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from . import cleanup


class OutputError(Exception):
    """The output cannot be written (one line, for exit code 2)."""


# --------------------------------------------------------------------------- permissions
def umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def creation_mode() -> int:
    """The permission bits ``open()`` gives a new file: 0666 & ~umask."""
    return 0o666 & ~umask()


# --------------------------------------------------------------------------- messages
def kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words (``"FIFO"``, ``"directory"``)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def is_stream(mode: int) -> bool:
    """A FIFO or a character/block device: written in place, never replaced."""
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _strerror(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def cannot_write(name, e: OSError) -> OutputError:
    """``OutputError("{name}: cannot write ({strerror})")``."""
    return OutputError(f"{name}: cannot write ({_strerror(e)})")


# --------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """Where an output really goes (``resolve_target``'s answer).

    ``path``: the file to replace or write, symbolic links resolved (absolute);
    ``stream``: True for an existing FIFO or character/block device, written in
    place; ``mode``: the permission bits of an existing regular file (kept when it
    is replaced), or None for a new file.
    """

    path: str
    stream: bool
    mode: int | None
    fd: int | None = None  # an open descriptor of ours the output names (/dev/stdout)


def resolve_target(output: str, inputs: Sequence[str | os.PathLike] = (), *,
                   streams: bool = True) -> Target:
    """Check that ``output`` may be written and say where the bytes will go.

    Rules (each refusal is an OutputError, one line naming ``output``):

    * a symbolic link is followed on purpose: the target is the file it finally
      points at (the link stays a link, the file it names gets the new content);
      a dangling link, or a loop, is refused (rnntool never creates a file at a
      place a link names);
    * a directory is refused; so is a socket or any other special file;
    * an existing FIFO or character/block device (``/dev/null``, ``mkfifo x``)
      is written in place as a stream when ``streams`` (else refused: a dump needs
      a seekable regular file); it is never replaced by a regular file;
    * an existing regular file that is also one of ``inputs`` (the same file
      after following links: same device and inode, so hard links too) is refused;
    * the directory that will hold the temporary file must exist and be writable.

    Anything else (absent, or a regular file) is fine; nothing is created here.
    """
    if not output:
        raise OutputError("the output file name is empty")
    name = output
    fd = fd_alias(output)
    if fd is not None:
        # /dev/stdout, /dev/fd/N, /proc/self/fd/N: the descriptor we already hold (which
        # may be a file opened for appending); following the link to a file name and
        # replacing that file would destroy what the shell set up.
        if not streams:
            raise OutputError(f"{name}: names the file descriptor {fd}, not a file; "
                              "give the file's own name")
        try:  # `-o /dev/stdout >> in.h5` would still write into an input
            st_fd = os.fstat(fd)
        except OSError as e:
            raise cannot_write(name, e) from None
        inp = same_file_among(st_fd, inputs) if stat.S_ISREG(st_fd.st_mode) else None
        if inp is not None:
            raise OutputError(f"{name}: is also an input ({inp}); refusing to overwrite it")
        return Target(output, True, None, fd)
    st = lstat_or_none(output, name)
    path = os.path.abspath(output)
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(output)
        except FileNotFoundError:
            raise OutputError(f"{name}: is a dangling symbolic link; refusing to create the "
                              "file it names") from None
        except OSError as e:
            raise cannot_write(name, e) from None
        path = os.path.realpath(output)
    if st is None:
        if output.endswith(("/", os.sep)):
            raise OutputError(f"{name}: is not a file name (it ends with '/')")
        mode = None
        stream = False
    elif stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{name}: is a directory")
    elif stat.S_ISREG(st.st_mode):
        mode = stat.S_IMODE(st.st_mode)
        stream = False
        inp = same_file_among(st, inputs)
        if inp is not None:
            same = os.fspath(inp) == output
            raise OutputError(f"{name}: is also an input{'' if same else f' ({inp})'}; "
                              "refusing to overwrite it")
    elif is_stream(st.st_mode):
        if not streams:
            raise OutputError(f"{name}: is a {kind(st.st_mode)}, not a regular file; "
                              "refusing to write to it")
        if not os.access(path, os.W_OK):
            raise OutputError(f"{name}: cannot write (Permission denied)")
        return Target(path, True, None)
    else:
        raise OutputError(f"{name}: is a {kind(st.st_mode)}; refusing to write to it")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise OutputError(f"{name}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputError(f"{name}: directory {directory} is not writable")
    return Target(path, stream, mode)


def fd_alias(path: str) -> int | None:
    """The descriptor of this process that ``path`` names through ``/dev/stdout``,
    ``/dev/fd/N`` or ``/proc/self/fd/N`` (following symbolic links to them), or None.

    Raises OutputError for another process's descriptor (``/proc/PID/fd/N``)."""
    p = os.path.abspath(path)
    for _ in range(40):  # the kernel's own limit on a chain of links
        m = re.fullmatch(r"/dev/(stdin|stdout|stderr)|/dev/fd/(\d+)|/proc/(self|thread-self|"
                         r"\d+)/fd/(\d+)", p)
        if m:
            if m.group(1):
                return ("stdin", "stdout", "stderr").index(m.group(1))
            if m.group(2):
                return int(m.group(2))
            if m.group(3) not in ("self", "thread-self") and int(m.group(3)) != os.getpid():
                raise OutputError(f"{path}: is another process's file descriptor; refusing to "
                                  "write to it")
            return int(m.group(4))
        if not os.path.islink(p):
            return None
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    return None


def resolve_target_inputs(dest: str, inputs: Sequence[str | os.PathLike]) -> None:
    """OutputError if ``dest`` (not following a final symbolic link: it would be
    replaced, not written through) is the same file as one of ``inputs``."""
    try:
        st = os.lstat(dest)
    except OSError:
        return
    inp = same_file_among(st, inputs)
    if inp is not None:
        raise OutputError(f"{dest}: is also an input ({inp}); refusing to overwrite it")


def same_file_among(st: os.stat_result, inputs: Sequence[str | os.PathLike]):
    """The first of ``inputs`` that is the file ``st`` describes (same device and inode:
    through symbolic and hard links), or None; inputs that cannot be stat'ed are
    skipped."""
    for inp in inputs:
        try:
            sti = os.stat(inp)
        except (OSError, ValueError):
            continue
        if (sti.st_dev, sti.st_ino) == (st.st_dev, st.st_ino):
            return inp
    return None


def lstat_or_none(path: str, name: str) -> os.stat_result | None:
    """``os.lstat(path)``, None if nothing is there; any other OSError becomes
    ``cannot_write(name, ...)``."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise cannot_write(name, e) from None


def check_replaceable(path: str, name: str | None = None, *, links: bool = False) -> None:
    """Right before a rename onto ``path``: it must be absent or a regular file (or, with
    ``links``, a symbolic link, which the rename replaces). Else OutputError."""
    st = lstat_or_none(path, name or path)
    if st is None:
        return
    if stat.S_ISREG(st.st_mode) or (links and stat.S_ISLNK(st.st_mode)):
        return
    raise OutputError(f"{name or path}: is now a {kind(st.st_mode)}; refusing to replace it")


# --------------------------------------------------------------------------- replacing a file
def finish_temp(fd: int, tmp: str, dest: str, mode: int | None, *, name: str | None = None,
                links: bool = False, close: Callable[[], None] | None = None) -> None:
    """The last step of every file rnntool writes: the temporary file ``tmp`` (open as
    ``fd``, everything written and flushed) gets ``mode`` (the replaced file's
    permission bits; None: a new file's, 0666 & ~umask) and is fsynced; ``close``
    (if given) closes it; ``dest`` is checked once more (``check_replaceable``,
    ``name`` in its message) and ``tmp`` renamed onto it.

    Raises OutputError when ``dest`` may no longer be replaced, the OSError of
    any step as it is; ``tmp`` is then left for the caller to discard.
    """
    os.fchmod(fd, creation_mode() if mode is None else mode)
    os.fsync(fd)
    if close is not None:
        close()
    check_replaceable(dest, name, links=links)
    os.replace(tmp, dest)


def close_quietly(f) -> None:
    """Close a file object, ignoring errors (it is being discarded)."""
    with contextlib.suppress(OSError, ValueError):
        f.close()


@contextlib.contextmanager
def replacing(dest: str, mode: int | None, *, name: str | None = None, file_mode: str = "w",
              links: bool = False) -> Iterator[IO]:
    """A file object whose content replaces ``dest`` when the block succeeds.

    It writes to a new temporary ``.rnntool-*.part`` in ``dest``'s directory,
    registered with ``rnntool.cleanup`` from before it exists (``file_mode``
    ``"w"``, text without newline translation, or ``"wb"``). After the block:
    flushed, then ``finish_temp`` (``mode``, fsync, close, ``check_replaceable``
    with ``links``, rename). On any exception (the block's own, a
    KeyboardInterrupt, ``cleanup.Terminated``) the temporary file is closed and
    removed, the exception propagates and ``dest`` is untouched.

    An OSError creating the file or finishing it becomes ``OutputError("{name}:
    cannot write (...)")`` (``name`` defaults to ``dest``); exceptions of the
    block itself propagate unchanged.
    """
    name = dest if name is None else name
    try:
        fd, tmp = cleanup.create_temp(os.path.dirname(os.path.abspath(dest)), ".part")
    except OSError as e:
        raise cannot_write(name, e) from None
    try:
        f = open(fd, file_mode, **({"newline": ""} if "b" not in file_mode else {}))  # noqa: SIM115
    except BaseException:
        os.close(fd)
        cleanup.discard(tmp)
        raise
    try:
        yield f
        try:
            f.flush()
            finish_temp(fd, tmp, dest, mode, name=name, links=links, close=f.close)
        except OSError as e:
            raise cannot_write(name, e) from None
    except BaseException:
        close_quietly(f)
        cleanup.discard(tmp)
        raise
    cleanup.unregister(tmp)


__all__ = ["OutputError", "Target", "cannot_write", "check_replaceable", "close_quietly",
           "creation_mode", "fd_alias", "finish_temp", "is_stream", "kind", "lstat_or_none",
           "replacing", "resolve_target", "resolve_target_inputs", "same_file_among", "umask"]
