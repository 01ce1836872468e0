"""Writing result rows: tsv, csv, jsonl, json or a rich table; atomic files.

stdout carries data only. ``-o FILE`` goes through a temporary file beside it
and a rename, so an interrupted or failed run leaves no half-written file;
FIFOs and devices are written in place, symbolic links followed (dangling ones
refused), and an output that is one of the inputs is refused
(``resolve_target``). Files created inside an output directory go through
``atomic_file`` and get names from ``confined_name``. Temporary files are
registered with ``rnntool.cleanup`` so that exit, SIGINT, SIGTERM and SIGHUP
remove them.

The file-level rules (``resolve_target``, ``check_replaceable``, permission
bits, the temporary file and its rename) live in ``rnntool.files``, shared with
``DumpWriter``; their names stay importable from here.
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
from typing import IO

from .files import (
    OutputError,
    Target,
    cannot_write,
    check_replaceable,
    close_quietly,
    creation_mode,
    fd_alias,
    is_stream,
    kind,
    lstat_or_none,
    replacing,
    resolve_target,
    resolve_target_inputs,
    umask,
)

FORMATS = ("tsv", "csv", "jsonl", "json", "table")


def default_format(output: str | None) -> str:
    """``table`` on a terminal, ``tsv`` when piped or written to a file."""
    if output in (None, "-") and sys.stdout.isatty():
        return "table"
    return "tsv"


def _cell(v, spec: str = ".6f") -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
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

        from .checks import show

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


class RowWriter:
    """Rows written as they come: ``tsv``, ``csv`` and ``jsonl`` line by line (the header
    with the first rows, or at ``close``), flushed after each ``write``, so that a
    pipeline sees the first rows while the run goes on; ``json`` and ``table`` are
    rendered whole by ``close``.

    ``RowWriter(out, fields, fmt, title=None, specs=None)``; ``write(rows)`` takes an
    iterable of dicts (any number, e.g. one utterance's); ``close()`` finishes (the
    header of an empty tsv/csv too). Formatting as ``render``.
    """

    def __init__(self, out: io.TextIOBase, fields: Sequence[str], fmt: str,
                 title: str | None = None, specs: dict[str, str] | None = None) -> None:
        if fmt not in FORMATS:
            raise OutputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
        self.out, self.fields, self.fmt, self.title = out, list(fields), fmt, title
        self.specs = specs or {}
        self._held: list[dict] = []  # json, table: rendered at close
        self._csv = None
        self.count = 0
        if fmt in ("tsv", "csv"):
            self._csv = csv.writer(out, delimiter="\t" if fmt == "tsv" else ",",
                                   lineterminator="\n")
        self._header = self._csv is not None  # written with the first rows (or at close):
        # a run that stops on bad input before any row leaves stdout empty

    def _write_header(self) -> None:
        if self._header:
            self._csv.writerow(self.fields)
            self._header = False

    def write(self, rows) -> None:
        rows = list(rows)
        self.count += len(rows)
        if self.fmt in ("json", "table"):
            self._held += rows
            return
        if rows:
            self._write_header()
        for r in rows:
            if self._csv is not None:
                self._csv.writerow([_cell(r.get(f), self.specs.get(f, ".6f"))
                                    for f in self.fields])
            else:
                self.out.write(json.dumps({f: _json_value(r.get(f)) for f in self.fields})
                               + "\n")
        if rows:
            self.out.flush()

    def close(self) -> None:
        self._write_header()
        if self.fmt in ("json", "table"):
            render(self._held, self.fields, self.fmt, self.out, self.title, self.specs)


# --------------------------------------------------------------------------- files
def check_writable(output: str | None, inputs: Sequence[str | os.PathLike] = ()) -> None:
    """Fail early (before any work) if ``-o output`` cannot be written: the rules of
    ``resolve_target`` (OutputError, one line). ``None``/``-`` (stdout) always pass."""
    if output in (None, "-"):
        return
    resolve_target(output, inputs)


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
            raise cannot_write(self._name, e) from None

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._f.flush()
        except self._passthrough:
            raise
        except OSError as e:
            raise cannot_write(self._name, e) from None

    def __getattr__(self, attr):
        return getattr(self._f, attr)


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
      target's directory (``files.replacing``), registered with
      ``rnntool.cleanup`` from before it exists. On success it is flushed,
      given the replaced file's permission bits (a new file: 0666 & ~umask),
      fsynced, checked once more (the target must still be absent or a regular
      file) and renamed onto the target, so the file is replaced whole or not at
      all. On any exception (the block's own, a KeyboardInterrupt,
      ``cleanup.Terminated``) the temporary file is removed and the exception
      propagates; the target is untouched.

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
    with replacing(target.path, target.mode, name=output) as f:
        yield _Sink(f, output)


def _write_stream(output: str, target: Target):
    flags = os.O_WRONLY | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        # No O_CREAT, no O_TRUNC: write in place; a descriptor we hold is duplicated
        # (its file offset and O_APPEND are the shell's).
        fd = os.dup(target.fd) if target.fd is not None else os.open(target.path, flags)
    except OSError as e:
        raise cannot_write(output, e) from None
    try:
        mode = os.fstat(fd).st_mode
        if target.fd is None and not is_stream(mode):  # replaced since it was checked
            raise OutputError(f"{output}: is now a {kind(mode)}; refusing to write to it")
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
            raise cannot_write(output, e) from None
    finally:
        close_quietly(f)


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike, mode: str = "wb",
                inputs: Sequence[str | os.PathLike] = ()) -> Iterator[IO]:
    """A file object whose content replaces ``dest`` when the block succeeds.

    For files the CLI creates inside an output directory (plot's PNGs), whose
    names come from data (see ``confined_name``). ``mode`` is ``"wb"`` or ``"w"``.
    The bytes go to a temporary ``.rnntool-*.part`` in ``dest``'s directory
    (``files.replacing``), registered with ``rnntool.cleanup``; on success it is
    flushed, given the replaced file's permission bits (new: 0666 & ~umask),
    fsynced and renamed onto ``dest``. On any exception it is removed and
    ``dest`` is untouched.

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
    st = lstat_or_none(dest, dest)
    if st is not None:
        if stat.S_ISREG(st.st_mode):
            keep = stat.S_IMODE(st.st_mode)
        elif not stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{dest}: is a {kind(st.st_mode)}; refusing to replace it")
    with replacing(dest, keep, file_mode=mode, links=True) as f:
        try:
            yield f
        except OSError as e:
            raise cannot_write(dest, e) from None


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



__all__ = [
    # rendering and the CLI's outputs
    "FORMATS", "NAME_MAX", "RowWriter", "atomic_file", "check_writable", "confined_name",
    "default_format", "open_output", "render",
    # moved to rnntool.files; still importable from here
    "OutputError", "Target", "check_replaceable", "creation_mode", "fd_alias", "resolve_target",
    "resolve_target_inputs", "umask",
]
