"""Writing result rows: tsv, csv, jsonl, json or a rich table; atomic files.

stdout carries data only. ``-o FILE`` goes through a temporary file beside it
and a rename, so an interrupted or failed run leaves no half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

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

        table = Table(title=title, show_edge=False, header_style="bold")
        for f in fields:
            table.add_column(f, justify="left" if f in ("utt_id", "token") else "right")
        for r in rows:
            table.add_row(*(_cell(r.get(f), specs.get(f, ".6f")) for f in fields))
        # Wide enough that rich never truncates a header; the terminal wraps if it must.
        width = max(200, shutil.get_terminal_size().columns)
        Console(file=out, soft_wrap=False, width=width).print(table)
    else:
        raise OutputError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def umask_perms(path: str) -> None:
    """mkstemp makes 0600 files; give a finished file the permissions open() would."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def check_writable(output: str | None) -> None:
    """Fail early (before any work) if ``output`` cannot be created."""
    if output in (None, "-"):
        return
    directory = os.path.dirname(os.path.abspath(output)) or "."
    if os.path.isdir(output):
        raise OutputError(f"{output}: is a directory")
    if not os.path.isdir(directory):
        raise OutputError(f"{output}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise OutputError(f"{output}: directory {directory} is not writable")


@contextlib.contextmanager
def open_output(output: str | None) -> Iterator[io.TextIOBase]:
    """stdout for ``None``/``-``; else a temp file renamed onto ``output`` on success only."""
    if output in (None, "-"):
        yield sys.stdout
        sys.stdout.flush()
        return
    check_writable(output)
    directory = os.path.dirname(os.path.abspath(output))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".rnntool-", suffix=".part", dir=directory)
    except OSError as e:
        raise OutputError(f"{output}: cannot write ({e.strerror})") from None
    try:
        with os.fdopen(fd, "w", newline="") as f:
            yield f
        umask_perms(tmp)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
