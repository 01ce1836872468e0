"""Writing result rows: tsv, csv, jsonl, json or a rich table; atomic files.

stdout carries data only. ``-o FILE`` goes through a temporary file beside it
and a rename, so an interrupted or failed run leaves no half-written file;
FIFOs and devices are written in place, symbolic links followed (dangling ones
refused), and an output that is one of the inputs is refused
(``resolve_target``). Files created inside an output directory go through
``atomic_file`` and get names from ``confined_name``. Temporary files are
registered with ``rnntool.cleanup`` so that exit, SIGINT, SIGTERM and SIGHUP
remove them.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import shutil
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from . import cleanup

FORMATS = ("tsv", "csv", "jsonl", "json", "table")


class OutputError(Exception):
    """The output cannot be written (one line, for exit code 2)."""


def default_format(output: str | None) -> str:
    """``table`` on a terminal, ``tsv`` when piped or written to a file."""
    if output in (None, "-") and sys.stdout.isatty():
        return "table"
    return "tsv"


def _cell(v, spec: str = ".6f") -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        text = format(v, spec)
        return text[1:] if text.startswith("-") and float(text) == 0 else text  # no "-0.000000"
    return "" if v is None else str(v)


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def render(rows: Sequence[dict], fields: Sequence[str], fmt: str, out: io.TextIOBase,
           title: str | None = None, specs: dict[str, str] | None = None) -> None:
    """Write ``rows`` (dicts) restricted to ``fields`` to ``out`` in ``fmt``.

    Floats print with 6 decimals in tsv/csv/table unless ``specs`` gives a field
    its own format spec (e.g. ``".3e"``); json and jsonl keep full precision.
    """
    specs = specs or {}
    if fmt in ("tsv", "csv"):
        w = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",", lineterminator="\n")
        w.writerow(fields)
        for r in rows:
            w.writerow([_cell(r.get(f), specs.get(f, ".6f")) for f in fields])
    elif fmt == "jsonl":
        for r in rows:
            out.write(json.dumps({f: _json_value(r.get(f)) for f in fields}) + "\n")
    elif fmt == "json":
        json.dump([{f: _json_value(r.get(f)) for f in fields} for r in rows], out, indent=1)
        out.write("\n")
    elif fmt == "table":
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        from .reader import show

        table = Table(title=title, show_edge=False, header_style="bold")
        for f in fields:
            table.add_column(f, justify="left" if f in ("utt_id", "token") else "right")
        for r in rows:
            # Text, not markup: an id "[red]x" from a file is shown as it is; control
            # characters (a terminal escape in an id) are shown escaped.
            table.add_row(*(Text(show(_cell(r.get(f), specs.get(f, ".6f")))) for f in fields))
        # Wide enough that rich never truncates a header; the terminal wraps if it must.
        width = max(200, shutil.get_terminal_size().columns)
        Console(file=out, soft_wrap=False, width=width).print(table)
    else:
        raise OutputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------- files
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


def umask_perms(path: str) -> None:
    """mkstemp makes 0600 files; give a finished file the permissions open() would."""
    os.chmod(path, creation_mode())


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _is_stream(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _strerror(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _cannot_write(name, e: OSError) -> OutputError:
    return OutputError(f"{name}: cannot write ({_strerror(e)})")


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
        return Target(output, True, None, fd)
    try:
        st = os.lstat(output)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _cannot_write(name, e) from None
    path = os.path.abspath(output)
    if st is not None and stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(output)
        except FileNotFoundError:
            raise OutputError(f"{name}: is a dangling symbolic link; refusing to create the "
                              "file it names") from None
        except OSError as e:
            raise _cannot_write(name, e) from None
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
        for inp in inputs:
            try:
                sti = os.stat(inp)
            except (OSError, ValueError):
                continue
            if (sti.st_dev, sti.st_ino) == (st.st_dev, st.st_ino):
                same = os.fspath(inp) == output
                raise OutputError(f"{name}: is also an input{'' if same else f' ({inp})'}; "
                                  "refusing to overwrite it")
    elif _is_stream(st.st_mode):
        if not streams:
            raise OutputError(f"{name}: is a {_kind(st.st_mode)}, not a regular file; "
                              "refusing to write to it")
        if not os.access(path, os.W_OK):
            raise OutputError(f"{name}: cannot write (Permission denied)")
        return Target(path, True, None)
    else:
        raise OutputError(f"{name}: is a {_kind(st.st_mode)}; refusing to write to it")
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
    import re

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


def check_writable(output: str | None, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Fail early (before any work) if ``-o output`` cannot be written: the rules of
    ``resolve_target`` (OutputError, one line). ``None``/``-`` (stdout) always pass."""
    if output in (None, "-"):
        return
    resolve_target(output, inputs)


def resolve_target_inputs(dest: str, inputs: Sequence[str | os.PathLike]) -> None:
    """OutputError if ``dest`` (not following a final symbolic link: it would be
    replaced, not written through) is the same file as one of ``inputs``."""
    try:
        st = os.lstat(dest)
    except OSError:
        return
    for inp in inputs:
        try:
            sti = os.stat(inp)
        except (OSError, ValueError):
            continue
        if (sti.st_dev, sti.st_ino) == (st.st_dev, st.st_ino):
            raise OutputError(f"{dest}: is also an input ({inp}); refusing to overwrite it")


def check_replaceable(path: str, name: str | None = None, *, links: bool = False) -> None:
    """Right before a rename onto ``path``: it must be absent or a regular file (or, with
    ``links``, a symbolic link, which the rename replaces). Else OutputError."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise _cannot_write(name or path, e) from None
    if stat.S_ISREG(st.st_mode) or (links and stat.S_ISLNK(st.st_mode)):
        return
    raise OutputError(f"{name or path}: is now a {_kind(st.st_mode)}; refusing to replace it")


class _Sink:
    """A text file whose write errors become OutputError naming the output."""

    def __init__(self, f, name: str, passthrough: tuple = ()) -> None:
        self._f = f
        self._name = name
        self._passthrough = passthrough

    def write(self, s: str) -> int:
        try:
            return self._f.write(s)
        except self._passthrough:
            raise
        except OSError as e:
            raise _cannot_write(self._name, e) from None

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._f.flush()
        except self._passthrough:
            raise
        except OSError as e:
            raise _cannot_write(self._name, e) from None

    def __getattr__(self, attr):
        return getattr(self._f, attr)


def _close_quietly(f) -> None:
    with contextlib.suppress(OSError, ValueError):
        f.close()


@contextlib.contextmanager
def open_output(output: str | None,
                inputs: Sequence[str | os.PathLike] = ()) -> Iterator[io.TextIOBase]:
    """The text stream for ``-o output``: stdout for ``None``/``-``, else a file.

    ``output`` is checked by ``resolve_target`` (symbolic links followed, a
    dangling one refused; directories, sockets and an output that is one of
    ``inputs`` refused) -- OutputError, before anything is created.

    * An existing FIFO or character/block device is opened and written in place.
      A reader of a FIFO that goes away raises BrokenPipeError (as stdout does).
    * Otherwise the rows go to a new temporary file ``.rnntool-*.part`` in the
      target's directory, registered with ``rnntool.cleanup`` from before it
      exists. On success it is flushed, fsynced, given the replaced file's
      permission bits (a new file: 0666 & ~umask), checked once more (the target
      must still be absent or a regular file) and renamed onto the target, so the
      file is replaced whole or not at all. On any exception (the block's own, a
      KeyboardInterrupt, ``cleanup.Terminated``) the temporary file is removed and
      the exception propagates; the target is untouched.

    Any OSError while writing, flushing, syncing or renaming (ENOSPC, EFBIG, EIO,
    ...) is raised as ``OutputError("{output}: cannot write ({strerror})")``.
    OSErrors the block raises itself, not through the stream, propagate unchanged.
    """
    if output in (None, "-"):
        yield sys.stdout
        sys.stdout.flush()
        return
    target = resolve_target(output, inputs)
    if target.fd == 1:
        yield sys.stdout
        sys.stdout.flush()
        return
    if target.stream:
        yield from _write_stream(output, target)
        return
    try:
        fd, tmp = cleanup.create_temp(os.path.dirname(target.path), ".part")
    except OSError as e:
        raise _cannot_write(output, e) from None
    try:
        f = open(fd, "w", newline="")  # noqa: SIM115 - closed below, on every path
    except BaseException:
        os.close(fd)
        cleanup.discard(tmp)
        raise
    try:
        yield _Sink(f, output)
        try:
            f.flush()
            os.fsync(fd)
            os.fchmod(fd, creation_mode() if target.mode is None else target.mode)
            f.close()
            check_replaceable(target.path, output)
            os.replace(tmp, target.path)
        except OSError as e:
            raise _cannot_write(output, e) from None
    except BaseException:
        _close_quietly(f)
        cleanup.discard(tmp)
        raise
    cleanup.unregister(tmp)


def _write_stream(output: str, target: Target):
    flags = os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # No O_CREAT, no O_TRUNC: write in place; a descriptor we hold is duplicated
        # (its file offset and O_APPEND are the shell's).
        fd = os.dup(target.fd) if target.fd is not None else os.open(target.path, flags)
    except OSError as e:
        raise _cannot_write(output, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if target.fd is None and not _is_stream(mode):  # replaced since it was checked
            raise OutputError(f"{output}: is now a {_kind(mode)}; refusing to write to it")
        f = open(fd, "w", newline="")  # noqa: SIM115 - closed below, on every path
    except BaseException:
        os.close(fd)
        raise
    try:
        sink = _Sink(f, output, passthrough=(BrokenPipeError,))
        yield sink
        sink.flush()
        try:
            f.close()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise _cannot_write(output, e) from None
    finally:
        _close_quietly(f)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "wb",
                inputs: Sequence[str | os.PathLike] = ()) -> Iterator[IO]:
    """A file object whose content replaces ``dest`` when the block succeeds.

    For files the CLI creates inside an output directory (plot's PNGs), whose
    names come from data (see ``confined_name``). ``mode`` is ``"wb"`` or ``"w"``.
    The bytes go to a temporary ``.rnntool-*.part`` in ``dest``'s directory,
    registered with ``rnntool.cleanup``; on success it is flushed, fsynced, given
    the replaced file's permission bits (new: 0666 & ~umask) and renamed onto
    ``dest``. On any exception it is removed and ``dest`` is untouched.

    ``dest`` absent or a regular file: replaced. ``dest`` a symbolic link: the
    link itself is replaced by the new file; nothing is ever written through it
    (its target is untouched). Anything else (a directory, FIFO, device, socket)
    is refused with OutputError before anything is written, and again right
    before the rename. An OSError raised inside the block (the writer's own
    writes) or while finishing becomes ``OutputError("{dest}: cannot write
    (...)")``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    dest = os.fspath(dest)
    keep = None
    resolve_target_inputs(dest, inputs)
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise _cannot_write(dest, e) from None
    if st is not None:
        if stat.S_ISREG(st.st_mode):
            keep = stat.S_IMODE(st.st_mode)
        elif not stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{dest}: is a {_kind(st.st_mode)}; refusing to replace it")
    directory = os.path.dirname(os.path.abspath(dest))
    try:
        fd, tmp = cleanup.create_temp(directory, ".part")
    except OSError as e:
        raise _cannot_write(dest, e) from None
    try:
        f = open(fd, mode, **({"newline": ""} if mode == "w" else {}))  # noqa: SIM115
    except BaseException:
        os.close(fd)
        cleanup.discard(tmp)
        raise
    try:
        try:
            yield f
            f.flush()
            os.fsync(fd)
            os.fchmod(fd, creation_mode() if keep is None else keep)
            f.close()
            check_replaceable(dest, links=True)
            os.replace(tmp, dest)
        except OSError as e:
            raise _cannot_write(dest, e) from None
    except BaseException:
        _close_quietly(f)
        cleanup.discard(tmp)
        raise
    cleanup.unregister(tmp)


# --------------------------------------------------------------------------- names
_SAFE_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._+-")
NAME_MAX = 255


def confined_name(utt_id: str, suffix: str = "") -> str:
    """A file name for ``utt_id`` that stays inside its directory: ``stem + suffix``.

    The stem is the id's UTF-8 bytes with every byte outside ``[A-Za-z0-9._+-]``
    written as ``%XX`` (upper-case hex), ``%`` itself included, and a leading
    ``.`` written as ``%2E`` (no hidden files, never ``.`` or ``..``); an empty id
    becomes ``%``. So the name has no ``/``, NUL or control character, and
    different ids give different names. A name longer than 255 bytes is cut (never
    inside a ``%XX``) and ends in ``~`` and 16 hex digits of the id's SHA-256
    before the suffix (no untruncated name contains ``~``). Lone surrogates are
    encoded as their surrogatepass bytes. ``suffix`` (e.g. ``".png"``) must be
    made of the safe characters and be at most 64 long; ValueError otherwise.
    """
    if not isinstance(utt_id, str):
        raise TypeError(f"utterance id must be a str, got {type(utt_id).__name__}")
    if len(suffix) > 64 or not all(ord(c) < 128 and ord(c) in _SAFE_BYTES for c in suffix):
        raise ValueError(f"file name suffix {suffix!r} is not made of [A-Za-z0-9._+-]")
    raw = utt_id.encode("utf-8", "surrogatepass")
    if not raw:
        stem = "%"
    else:
        stem = "".join(chr(b) if b in _SAFE_BYTES else f"%{b:02X}" for b in raw)
        if stem.startswith("."):
            stem = "%2E" + stem[1:]
    if len(stem) + len(suffix) <= NAME_MAX:
        return stem + suffix
    digest = hashlib.sha256(raw).hexdigest()[:16]
    cut = stem[: NAME_MAX - len(suffix) - 1 - len(digest)]
    pct = cut.rfind("%", len(cut) - 2)
    if pct != -1:
        cut = cut[:pct]  # do not split a %XX
    return f"{cut}~{digest}{suffix}"

