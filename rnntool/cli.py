"""The ``rnntool`` command line: a thin Typer layer over the library.

stdout carries data only; progress, summaries, warnings and errors go to
stderr. Exit codes: 0 ok, 1 a check found a problem, 2 bad input, usage or I/O.
Heavy imports (torch, numba, h5py, matplotlib) happen inside the commands so
that ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer

from . import __version__

app = typer.Typer(
    name="rnntool",
    help="Transducer losses (RNN-T, TDT): score dumped logits, align, time words, check "
    "gradients, see the lattice, scale out over shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _line(message: str) -> str:
    """``message`` as one printable line: control characters (a newline or terminal
    escape in an id from a file, quoted by a library's message) shown escaped."""
    return message if message.isprintable() else repr(message)[1:-1]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise (``_line``)."""
    print(f"rnntool: error: {_line(message)}", file=sys.stderr)
    return typer.Exit(code)


def command(fn):
    """Wrap a command: Python warnings become one-line notes; bad input one line and exit
    code 2, Ctrl-C 130, a closed pipe quiet (``_run``)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if os.environ.get("RNNTOOL_DEBUG"):
            return _run(fn, args, kwargs)  # raw warnings and tracebacks
        # No raw Python warning (source line and all) reaches a user: those raised
        # while one utterance is processed are turned into lines naming it
        # (_Utterance); any other becomes one "rnntool: warning:" line.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return _run(fn, args, kwargs)
            finally:
                for message in _unique(caught):
                    print(f"rnntool: warning: {_line(message)}", file=sys.stderr)

    return wrapper


def _unique(caught) -> list[str]:
    """First lines of the recorded warnings' messages, each once, in order."""
    seen: dict[str, None] = {}
    for w in caught:
        text = str(w.message).strip()
        seen.setdefault(text.splitlines()[0] if text else w.category.__name__, None)
    return list(seen)


def _run(fn, args, kwargs):
    """Turn bad input into one line and exit code 2, Ctrl-C into 130, a closed pipe into quiet."""
    from .distributed import ShareError
    from .dump import DumpError
    from .output import OutputError

    try:
        return fn(*args, **kwargs)
    except (typer.Exit, typer.Abort):
        raise
    except BrokenPipeError:
        # `rnntool score f.h5 | head`: the reader left; say nothing.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise typer.Exit(0) from None
    except KeyboardInterrupt:
        print("rnntool: interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except (DumpError, OutputError, ShareError, ValueError, TypeError, OSError,
            RuntimeError) as e:
        if os.environ.get("RNNTOOL_DEBUG"):
            raise
        raise fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None


class _Utterance:
    """Processing one utterance: its warnings are recorded, and its problem reported.

    ``report(problem)`` prints one line naming file and utterance when the
    library found that its loss cannot be true (``score.loss_problem``). On
    leaving, warnings of an utterance with a problem are dropped (consequences of
    it); the engine's own ``ImpossibleLossWarning``s too (they name a batch index,
    and the library checks the same values itself); any other becomes one line
    naming the utterance.
    """

    def __init__(self, path, utt_id: str) -> None:
        from .reader import show

        self.where = f"{show(path)}: utterance {show(utt_id)}"
        self.problem: str | None = None

    def __enter__(self) -> _Utterance:
        self._cm = warnings.catch_warnings(record=True)
        self._caught = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        from .engine import ImpossibleLossWarning

        self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None and self.problem is None:
            for message in _unique(w for w in self._caught
                                   if not issubclass(w.category, ImpossibleLossWarning)):
                print(f"rnntool: {self.where}: warning: {_line(message)}", file=sys.stderr)

    def report(self, problem: str | None) -> None:
        """Print ``problem`` (why the utterance's loss cannot be true), if any."""
        self.problem = problem
        if problem is not None:
            print(f"rnntool: {self.where}: {problem}", file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rnntool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Transducer losses (RNN-T, TDT): score dumped logits, align, time words, check
    gradients, see the lattice, scale out over shards."""


# --------------------------------------------------------------------------- shared options
Inputs = Annotated[list[Path], typer.Argument(
    metavar="FILE", help="HDF5 dumps (keyed or padded layout, full or lattice).")]
Output = Annotated[str | None, typer.Option(
    "-o", "--output", metavar="FILE", help="Write here (atomically); '-' = stdout.")]
Format = Annotated[str | None, typer.Option(
    "--format", "-f", metavar="FORMAT",
    help="tsv|csv|jsonl|json|table (default: table on a terminal, tsv otherwise).")]
Device = Annotated[str, typer.Option("--device", metavar="DEVICE", help="auto|cpu|cuda.")]
Blank = Annotated[int | None, typer.Option(
    "--blank", metavar="N", help="Blank index (overrides the file).")]
Utts = Annotated[list[str] | None, typer.Option(
    "--utt", metavar="ID", help="Only this utterance id (repeatable).")]
UttList = Annotated[str | None, typer.Option(
    "--utt-list", metavar="FILE", help="File of utterance ids, one a line; '-' = stdin.")]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Hide progress and info.")]
Shard = Annotated[str | None, typer.Option(
    "--shard", metavar="K/N", help="Only share K of N (0-based) of the utterances, written to "
    "FILE.part-K-of-N beside -o FILE; 'rnntool merge' joins the N parts.")]
Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the part file a stopped --shard or torchrun run left: "
    "utterances already in it are skipped (same inputs and options, else exit 2).")]


def _check_format(fmt: str | None, output: str | None) -> str:
    from .output import FORMATS, default_format

    fmt = fmt or default_format(output)
    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _backend(device: str) -> str:
    """The engine backend that ``--device`` selects (``devices.backend_for``)."""
    from .devices import backend_for

    try:
        return backend_for(device)
    except ValueError as e:
        raise fail(f"--device {e}" + ("; use --device cpu" if device == "cuda" else "")) from None


def _wanted(utts: list[str] | None, utt_list: str | None) -> list[str] | None:
    """The ids --utt and --utt-list select, each once, in the order first given."""
    if not utts and not utt_list:
        return None
    wanted = list(utts or [])
    if utt_list:
        wanted += _read_utt_list(utt_list)
    return list(dict.fromkeys(wanted))


_MAX_ID_LINE = 1 << 20


def _read_utt_list(utt_list: str) -> list[str]:
    """Utterance ids, one a line (blank lines skipped), from a file or ``-`` (stdin):
    UTF-8 text with lines under 1 MiB (``/dev/zero`` is not a list of ids)."""
    name = "standard input" if utt_list == "-" else _line(utt_list)
    ids: list[str] = []
    try:
        f = sys.stdin.buffer if utt_list == "-" else open(utt_list, "rb")  # noqa: SIM115
    except OSError as e:
        raise fail(f"{name}: cannot read utterance list ({e.strerror})") from None
    try:
        for n, raw in enumerate(iter(lambda: f.readline(_MAX_ID_LINE + 1), b""), 1):
            if len(raw) > _MAX_ID_LINE:
                raise fail(f"{name}: line {n} is longer than 1 MiB: not a list of utterance ids")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise fail(f"{name}: line {n} is not UTF-8 text") from None
            if line:
                ids.append(line)
    except OSError as e:
        raise fail(f"{name}: cannot read utterance list ({e.strerror})") from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    return ids


class Selection(list):
    """``[(reader, selected ids)]`` in input order; ``several``: more than one input
    (rows then carry a ``file`` column); ``empty``: the inputs that hold no utterance
    at all (each a problem: one line, exit 1)."""

    several: bool = False
    empty: list[str]

    def report_empty(self) -> bool:
        """Print one line per empty input; whether there was any."""
        for name in self.empty:
            print(f"rnntool: {_line(name)}: the dump holds no utterances", file=sys.stderr)
        return bool(self.empty)


@contextlib.contextmanager
def _selection(inputs: list[Path], blank: int | None, utts: list[str] | None,
               utt_list: str | None, direct: bool = True, output: str | None = None):
    """Open every input and yield a ``Selection``; close them all after.

    Each file is first opened in a child process (``reader.probe``: a file that
    crashes HDF5 itself is one line). A file given twice (by any name: the same
    device and inode) is read once; ids are selected once each. An id asked for
    with --utt/--utt-list that no input holds is an error; so is an ``output``
    that is a file an input's external links name.
    """
    from .output import check_writable
    from .reader import DumpReader, probe, show

    wanted = _wanted(utts, utt_list)
    readers = []
    try:
        seen = set()
        for p in inputs:
            with contextlib.suppress(OSError):
                st = os.stat(p)
                if (st.st_dev, st.st_ino) in seen:
                    continue  # the same file again: its utterances once
                seen.add((st.st_dev, st.st_ino))
            probe(p, blank)
            readers.append(DumpReader(p, blank=blank, direct=direct))
        check_writable(output, _inputs_of(inputs, utt_list) + _linked(readers))
        selected = Selection()
        selected.several = len(readers) > 1
        selected.empty = [r.name for r in readers if len(r) == 0]
        found = set()
        for r in readers:
            ids = r.utt_ids if wanted is None else [u for u in wanted if u in r]
            found.update(ids)
            selected.append((r, ids))
        if wanted is not None:
            missing = [u for u in wanted if u not in found]
            if missing:
                where = show(inputs[0]) if len(inputs) == 1 else "any input"
                raise fail(f"{where}: no utterance {show(missing[0])!r}"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        yield selected
    finally:
        for r in readers:
            r.close()


def _linked(readers) -> list[str]:
    """Files the inputs' external links name: an output must be none of them either."""
    return [f for r in readers for f in r.linked_files]


def _inputs_of(inputs: list[Path], utt_list: str | None) -> list[str]:
    """Every file a command reads: an output must be none of them."""
    return [str(p) for p in inputs] + ([utt_list] if utt_list not in (None, "-") else [])


def _output_format(fmt: str | None, output: str | None, inputs: list[str]) -> str:
    """The --format to use, after checking it and that -o can be written and is not one of
    the inputs (before any work)."""
    from .output import check_writable

    fmt = _check_format(fmt, output)
    check_writable(output, inputs)
    return fmt


def _progress(quiet: bool):
    """A rich progress bar on stderr (only on a terminal and without -q)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    disable = quiet or not sys.stderr.isatty()
    # redirect_stdout=False: rows stream to stdout while the bar is live, and must stay
    # there (rich would otherwise print them on the bar's console, stderr).
    return Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=_stderr(), transient=True, disable=disable,
        redirect_stdout=False,
    )


# --------------------------------------------------------------------------- scale-out
# A command that scales out is a producer of ``distributed.Record``s (one per
# utterance, in the order of the ``Work`` it is given, printing its per-utterance
# lines as it goes) and a tally that writes records' rows in order and prints the
# summary; ``_run_job`` runs them in one process, as one share (--shard), or as
# one rank of a torchrun job, and ``merge`` runs the tally over merged parts.
# A tally is made as ``tally_class(several=, report=, fmt=, **tally_args)``; one with a
# ``sink(output, reads, fields, quiet)`` context manager opens its own output (timestamps'
# CTM and lhotse lines) instead of ``_rows_out``, and may write more before the output
# is committed (timestamps' --summary).
def _jobs() -> dict:
    """command -> (table title, float specs, tally class, progress bar's word)."""
    return {
        # one title for RNN-T and TDT dumps: a merge never opens the inputs to tell
        "score": ("Loss per utterance", None, _ScoreTally, "scoring"),
        "align": ("Alignment (best path)", None, _AlignTally, "aligning"),  # tokens or arcs
        "timestamps": ("Word times", None, _TimesTally, "timing"),
    }


def _tally_out(tally, output, reads, fields, fmt, title, specs, quiet):
    """Where ``tally`` writes: its own ``sink``, else a ``RowWriter`` (``_rows_out``)."""
    sink = getattr(tally, "sink", None)
    if sink is not None:
        return sink(output, reads, fields, quiet)
    return _rows_out(output, reads, fields, fmt, title, specs)


def _run_job(command: str, selected, *, output, fmt: str, reads: list[str], fields,
             options: dict, shard: str | None, resume: bool, quiet: bool, backend: str,
             produce, tally_args: dict | None = None) -> int:
    """Run ``command`` on ``selected``: rows to ``-o``/stdout in one process; or, with
    ``--shard K/N`` or under torchrun, this process's share into its part file
    (``distributed``), merged into ``-o`` by rank 0 under torchrun. ``fields(pairs)``:
    the columns for ``[(reader, ids)]`` (a share's are merged: ``merged_fields``), so
    that no process looks at utterances outside its share. ``tally_args``: more
    keywords for the tally (``_jobs``). Returns the exit code (0, or 1 for problems the
    rows found; under torchrun 2 when the job failed); raises for bad input."""
    from .distributed import ShareError, parse_share, torchrun_env

    title, specs, tally_class, doing = _jobs()[command]
    try:
        tr = torchrun_env()
    except ShareError as e:
        raise fail(str(e)) from None
    if tr is None and shard is None:
        if resume:
            raise fail("--resume continues a part file: it needs --shard K/N (or torchrun)")
        tally = tally_class(several=selected.several, report=False, fmt=fmt,
                            **(tally_args or {}))
        with _progress(quiet) as bar, _tally_out(tally, output, reads, fields(selected), fmt,
                                                 title, specs, quiet) as out:
            task = bar.add_task(doing, total=sum(len(ids) for _, ids in selected))
            for rec in produce(_all_work(selected), lambda n: bar.advance(task, n)):
                tally.add(rec, out)
        code = tally.summary(quiet)
        return max(code, int(selected.report_empty()))
    if tr is not None and shard is not None:
        raise fail("--shard is for plain processes; under torchrun each rank takes its own "
                   "share (RANK of WORLD_SIZE)")
    try:
        share = tr.share if tr is not None else parse_share(shard)
    except ValueError as e:
        raise fail(str(e)) from None
    return _run_share(command, selected, share, tr, output=output, fmt=fmt, reads=reads,
                      fields=fields, options=options, resume=resume, quiet=quiet,
                      backend=backend, produce=produce, tally_args=tally_args)


def _all_work(selected):
    from .distributed import plan_work

    return plan_work(selected)


def _run_share(command, selected, share, tr, *, output, fmt, reads, fields, options, resume,
               quiet, backend, produce, tally_args=None) -> int:
    """One share into its part; under torchrun (``tr``) then the barrier, and rank 0's
    merge. Every rank returns (or exits with) the same code."""
    from .devices import tensor_device
    from .distributed import (
        STOPPED,
        PartWriter,
        ShareError,
        checked_output,
        fingerprint,
        part_path,
        plan_work,
    )
    from .output import check_writable

    what = "torchrun" if tr is not None else "--shard K/N"
    try:
        base = checked_output(output, what)
        part = part_path(base, share)
        check_writable(part, reads)
        fp = fingerprint(command, selected, options=options, fmt=fmt,
                         several=selected.several, empty=selected.empty)
    except ShareError as e:
        raise fail(str(e)) from None
    rank0 = tr is None or tr.rank == 0
    if tr is not None:
        try:
            tr.init(cuda=backend == "cuda" and tensor_device(backend) == "cuda")
        except ShareError as e:
            raise fail(str(e)) from None
    code, writer = 0, None
    try:
        if tr is not None:
            where = tr.use_device(backend)
            if not quiet and tr.rank == 0:
                _stderr().print(f"torchrun: {tr.world_size} rank"
                                f"{'s' if tr.world_size > 1 else ''}; rank 0 on {where}",
                                markup=False)
        mine = plan_work(selected, share)
        writer = PartWriter(part, fp, share, len(mine), fields(mine.pairs()), resume=resume)
        n_share = len(mine)
        work = mine.without(writer.done)
        flagged = 0
        with _progress(quiet or not rank0) as bar:
            task = bar.add_task(f"{_jobs()[command][3]} {share}", total=len(work))
            for rec in produce(work, lambda n: bar.advance(task, n)):
                writer.write(rec)
                flagged += bool(rec.info.get("problem") or rec.info.get("bad"))
                if tr is not None and tr.should_stop():
                    raise _Stopped
        writer.finish()
        code = 1 if flagged or writer.flagged else 0
        if not quiet and tr is None:
            _stderr().print(f"share {share}: {n_share} utterances ({n_share - len(work)} "
                            f"already done) in {part}; when every share is done: rnntool "
                            f"merge {base}.part-*-of-{share.count} -o {base}", markup=False)
    except _Stopped:
        code = STOPPED
    except typer.Exit as e:
        if tr is None:
            raise
        code = e.exit_code or 2
        tr.tell_stop()
    except Exception as e:  # noqa: BLE001 - every rank must reach the barrier
        if tr is None:
            raise
        code = 2
        _report_error(e)
        tr.tell_stop()
    finally:
        if writer is not None:
            writer.close()
    if tr is None:
        return max(code, int(selected.report_empty()))
    return _barrier_and_merge(command, selected, tr, base, code, output=output, fmt=fmt,
                              reads=reads, quiet=quiet, tally_args=tally_args)


class _Stopped(Exception):  # noqa: N818 - a signal between ranks, not an error
    """Another rank failed: this one stops before its share is done."""


def _report_error(e: BaseException) -> None:
    """The one line ``_run`` prints for ``e`` (a traceback with RNNTOOL_DEBUG)."""
    if os.environ.get("RNNTOOL_DEBUG"):
        import traceback

        traceback.print_exception(e)
        return
    text = str(e).strip()
    print(f"rnntool: error: {_line(text.splitlines()[0] if text else repr(e))}",
          file=sys.stderr)


def _barrier_and_merge(command, selected, tr, base, code, *, output, fmt, reads,
                       quiet, tally_args=None) -> int:
    """Wait for every rank; rank 0 merges the parts into ``-o`` when none failed, and
    every rank then exits with the job's code (2 when any rank failed or the merge did)."""
    from .distributed import (
        Share,
        check_parts,
        merged_fields,
        merged_records,
        part_path,
        remove_parts,
    )

    codes = tr.gather_status(code)
    result = 0
    if max(codes) >= 2:
        failed = [k for k, c in enumerate(codes) if c == 2] or [
            k for k, c in enumerate(codes) if c >= 2]
        if tr.rank == 0:
            print(f"rnntool: error: rank{'s' if len(failed) > 1 else ''} "
                  f"{', '.join(map(str, failed))} of {tr.world_size} failed (see "
                  f"{'their' if len(failed) > 1 else 'its'} message) and the job stopped; "
                  f"{_line(base)} not written, the parts stay for --resume",
                  file=sys.stderr)
        result = 2
    elif tr.rank == 0:
        paths = [part_path(base, Share(k, tr.world_size)) for k in range(tr.world_size)]
        try:
            title, specs, tally_class, _ = _jobs()[command]
            parts = check_parts(paths)
            tally = tally_class(several=selected.several, report=False, fmt=fmt,
                                **(tally_args or {}))
            with _tally_out(tally, output, reads + paths, merged_fields(parts), fmt, title,
                            specs, quiet) as out:
                for rec in merged_records(parts):
                    tally.add(rec, out)
            result = max(tally.summary(quiet), max(codes), int(selected.report_empty()))
            remove_parts(paths)
        except Exception as e:  # noqa: BLE001 - the other ranks wait for this answer
            _report_error(e)
            result = 2
    final = max(tr.gather_status(result))
    tr.close()
    return final


# --------------------------------------------------------------------------- score
@app.command()
@command
def score(
    inputs: Inputs,
    output: Output = None,
    fmt: Format = None,
    device: Device = "auto",
    blank: Blank = None,
    utts: Utts = None,
    utt_list: UttList = None,
    batch_mb: Annotated[int, typer.Option(
        "--batch-mb", metavar="MIB", help="Memory budget of one padded batch, MiB.")] = 64,
    via_hdf5: Annotated[bool, typer.Option("--via-hdf5", "--no-mmap",
                                           help="Read all data through HDF5, even raw "
                                           "data rnntool could read straight from the "
                                           "file.")] = False,
    skip_bad: Annotated[bool, typer.Option(
        "--skip-bad", help="Name each bad utterance on stderr and score the others "
        "(exit 1 at the end) instead of stopping at the first (exit 2).")] = False,
    shard: Shard = None,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Per-utterance losses of dumped logits or lattice dumps (RNN-T; TDT for a TDT
    dump: model_kind tdt, with its durations).

    One row per utterance: utt_id, T, U, loss (-log P(y|x), nats), loss_per_frame,
    loss_per_token (loss / max(U, 1)); and stored_loss, loss_diff when the dump
    carries the trainer's own loss; with several inputs a file column first. Rows
    appear in input order as utterances are scored (tsv, csv, jsonl; json and
    table at the end). A summary goes to stderr. Exit 1 if any loss cannot be
    true: NaN or inf, or below 0 by more than float rounding (8 float32 ulps per
    lattice arc, at least 1e-6 nats); those utterances are named on stderr, one
    line each, and their rows are still written as computed. Bad input (a label
    out of range, a broken array) stops the run with one line and exit 2, unless
    --skip-bad. An input with no utterances is one line and exit 1.

    Many shards: under torchrun each rank scores its share and rank 0 merges them
    into -o; --shard K/N scores share K of N into FILE.part-K-of-N beside -o FILE,
    for 'rnntool merge'; --resume continues a part a stopped run left (README:
    Scoring many shards).
    """
    from .score import selection_fields

    reads = _inputs_of(inputs, utt_list)
    fmt = _output_format(fmt, output, reads)
    backend = _backend(device)
    if batch_mb < 0:
        raise fail(f"--batch-mb {batch_mb} must be 0 or more (MiB; 0: one utterance a batch)")
    with _selection(inputs, blank, utts, utt_list, direct=not via_hdf5,
                    output=output) as selected:
        code = _run_job(
            "score", selected, output=output, fmt=fmt, reads=reads,
            fields=lambda pairs: _with_file(selection_fields(pairs), selected),
            options={"--blank": blank, "--device": backend, "--skip-bad": skip_bad},
            shard=shard, resume=resume, quiet=quiet, backend=backend,
            produce=functools.partial(_score_records, backend=backend,
                                      budget_bytes=batch_mb << 20, skip_bad=skip_bad))
    if code:
        raise typer.Exit(code)


def _score_records(work, advance, *, backend, budget_bytes, skip_bad):
    """One ``Record`` per utterance of ``work`` (a ``distributed.Work``), as scored; the
    lines naming a bad utterance or an impossible loss go to stderr as they come."""
    from .distributed import Record
    from .reader import show
    from .score import score_reader

    for i, reader, ids, js in work:
        rows = score_reader(reader, ids, backend=backend, budget_bytes=budget_bytes,
                            on_batch=advance, skip_bad=skip_bad)
        for j, r in zip(js, rows, strict=True):
            if "_bad" in r:
                print(f"rnntool: {_line(r['_bad'])}", file=sys.stderr)
                yield Record((i, j), [], {"bad": r["_bad"]})
                continue
            if r["_problem"] is not None:
                print(f"rnntool: {reader.name}: utterance {show(r['utt_id'])}: "
                      f"{r['_problem']}", file=sys.stderr)
            row = {k: v for k, v in r.items() if not k.startswith("_")}
            row["file"] = reader.name
            yield Record((i, j), [row], {"problem": r["_problem"]})


class _ScoreTally:
    """``score``'s rows written in order, and its summary: counted over every row in the
    single-process order (a merge of parts gives the same bits as one process, never
    an average of the parts' averages). ``report``: also print each record's problem
    line (``rnntool merge``: the shares' own runs printed them elsewhere)."""

    def __init__(self, several: bool, report: bool, fmt: str) -> None:
        self.several, self.report = several, report
        self.scored: list[dict] = []
        self.problems = self.bad = 0

    def add(self, rec, out) -> None:
        from .reader import show

        if rec.info.get("bad"):
            self.bad += 1
            if self.report:
                print(f"rnntool: {_line(rec.info['bad'])}", file=sys.stderr)
            return
        if rec.info.get("problem"):
            self.problems += 1
            if self.report:
                r = rec.rows[0]
                print(f"rnntool: {_line(r['file'])}: utterance {show(r['utt_id'])}: "
                      f"{rec.info['problem']}", file=sys.stderr)
        out.write(rec.rows)
        self.scored += [{"utt_id": r["utt_id"], "loss": r["loss"], "T": r["T"], "U": r["U"],
                         "_file": r["file"]} for r in rec.rows]

    def summary(self, quiet: bool) -> int:
        """Print the summary (unless ``quiet``); the exit code the rows call for."""
        from .reader import show
        from .score import summarize

        if not quiet:
            summary = summarize(self.scored)
            err = _stderr()
            err.print(f"{summary['count']} utterances, mean loss {summary['mean']:.4f}, "
                      f"total {summary['total']:.4f} nats ({summary['finite']} finite; "
                      f"{summary['per_frame']:.4f} per frame over {summary['frames']}, "
                      f"{summary['per_token']:.4f} per token over {summary['tokens']})"
                      + (f"; {self.bad} bad, skipped" if self.bad else ""), markup=False)
            if summary["worst"]:
                err.print("worst: " + ", ".join(
                    (f"{show(r['_file'])}:" if self.several else "")
                    + f"{show(r['utt_id'])} {r['loss']:.3f}" for r in summary["worst"]),
                    markup=False)
        return 1 if self.problems or self.bad else 0


# --------------------------------------------------------------------------- inspect
@app.command()
@command
def inspect(
    inputs: Inputs,
    output: Output = None,
    fmt: Format = None,
    blank: Blank = None,
    quiet: Quiet = False,
) -> None:
    """What each dump holds, and every problem in it: one row per file.

    Fields: file, kind (full or lattice), model_kind (rnnt or tdt), durations (a
    TDT dump's duration set, comma-separated; empty for RNN-T), layout, blank,
    vocab_size (tokens; a TDT node stores V + D logits), vocab (true
    if token names are stored), input_kind, frame_shift (seconds per logit frame,
    empty when the dump records none), utterances, T_min/T_max, U_min/U_max,
    V_min/V_max, dtypes, with_stored_loss, with_grads, size_bytes, problems (a
    count). Every problem found goes to stderr, one line each naming the file and
    utterance, and makes the exit code 1: bad labels, lengths or shapes; NaN/+inf
    logits (in a lattice dump, NaN/+inf log-probs, or arrays that disagree in
    shape); a loss that is +inf or below 0 beyond rounding (as score says); a
    stored frame_shift that is not a finite number of seconds > 0; and
    for input_kind=log_probs, rows that do not normalise: |logsumexp over V| above
    4 * eps * max(1, ln V), eps that of the precision the values carry (float16
    9.8e-4, bfloat16 7.8e-3, float32 1.2e-7, float64 2.2e-16), 8 times what
    rounding can do (a TDT node's tokens and durations each on their own).
    """
    from .analysis import INSPECT_FIELDS, inspect_dump
    from .output import open_output, render

    reads = _inputs_of(inputs, None)
    fmt = _output_format(fmt, output, reads)
    rows, problems = [], []
    with (_selection(inputs, blank, None, None, output=output) as selected,
          _progress(quiet) as bar):
        task = bar.add_task("inspecting", total=sum(len(r) for r, _ in selected))
        for reader, _ in selected:
            report = inspect_dump(reader, on_utterance=lambda: bar.advance(task))
            rows.append(_with_model(_with_frame_shift(report.facts(), reader, report.problems),
                                    report))
            problems += report.problems
    with open_output(output, reads) as out:
        render(rows, _inspect_fields(INSPECT_FIELDS), fmt, out, title="Dumps")
    for p in problems:
        print(f"rnntool: {_line(p)}", file=sys.stderr)
    if selected.report_empty() or problems:
        raise typer.Exit(1)


def _inspect_fields(fields: list[str]) -> list[str]:
    """``inspect``'s columns: the report's, with ``model_kind`` and ``durations`` after
    ``kind`` and ``frame_shift`` after ``input_kind``."""
    at = fields.index("input_kind") + 1
    fields = [*fields[:at], "frame_shift", *fields[at:]]
    at = fields.index("kind") + 1
    return [*fields[:at], "model_kind", "durations", *fields[at:]]


def _with_model(facts: dict, report) -> dict:
    """``facts`` with the dump's ``model_kind`` and ``durations`` (comma-separated; None
    for an RNN-T dump)."""
    durations = None if report.durations is None else ",".join(map(str, report.durations))
    return {**facts, "model_kind": report.model_kind, "durations": durations}


def _with_frame_shift(facts: dict, reader, problems: list[str]) -> dict:
    """``facts`` with the dump's ``frame_shift`` (None when absent); a bad stored one is
    a problem (appended to ``problems`` and counted), its column empty."""
    from .dump import DumpError

    try:
        return {**facts, "frame_shift": reader.frame_shift}
    except DumpError as e:
        problems.append(str(e))
        return {**facts, "frame_shift": None, "problems": facts["problems"] + 1}


# --------------------------------------------------------------------------- align / plot
def _utterances(selected, with_grads: bool = False, norms: bool = False):
    """Yield ``(reader, Utterance)`` one at a time, validated, in input order (a
    ``LatticeUtterance`` from a lattice dump, its third array only for ``norms``)."""
    for reader, ids in selected:
        if reader.kind != "lattice":
            for utt_id in ids:
                yield reader, reader.read(utt_id, with_grads=with_grads)
            continue
        names = ("blank_lp", "emit_lp") + (("log_p2_others",) if norms else ())
        if reader.model_kind == "tdt":  # (a TDT lattice stores no log_p2_others)
            names = reader.lattice_names
        for utt_id in ids:
            yield reader, reader.read_lattice(utt_id, names=names)


@contextlib.contextmanager
def _rows_out(output: str | None, reads: list[str], fields: list[str], fmt: str,
              title: str, specs: dict | None = None):
    """A ``RowWriter`` on ``-o``/stdout: rows appear as they are written (tsv, csv,
    jsonl); the file, if any, is renamed into place only when the block succeeds."""
    from .output import RowWriter, open_output

    with open_output(output, reads) as out:
        writer = RowWriter(out, fields, fmt, title=title, specs=specs)
        yield writer
        writer.close()


def _with_file(fields: list[str], selected) -> list[str]:
    """``fields`` with a ``file`` column first when there are several inputs."""
    return ["file", *fields] if selected.several else list(fields)


def _tagged(rows, reader) -> list[dict]:
    """``rows`` with the input's name as ``file``."""
    return [dict(r, file=reader.name) for r in rows]


@app.command("align")
@command
def align_cmd(
    inputs: Inputs,
    output: Output = None,
    fmt: Format = None,
    device: Device = "auto",
    blank: Blank = None,
    utts: Utts = None,
    utt_list: UttList = None,
    shard: Shard = None,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Where each token is emitted, on the best path and in expectation.

    One row per token: utt_id, position (0-based), token_id, token (from the
    dump's vocab), frame (Viterbi emission frame), expected_frame (posterior
    mean over all alignments), frame_posterior (probability of emitting the token
    at that frame), and the utterance's loss (-log P(y|x), nats) and
    best_log_prob (log P of the best path) on each of its rows; with several
    inputs a file column first. Rows appear as utterances finish (tsv, csv,
    jsonl). In table mode each utterance's best path's share of the probability
    also goes to stderr. An utterance whose loss is not finite (NaN or +inf
    logits, or no possible alignment) gets no rows: one line on stderr names it,
    the others are still aligned, and the exit code is 1 (also for a loss below
    0 beyond rounding, whose rows are written). Posteriors are within [0, 1].
    Under torchrun, and with --shard K/N and --resume, as score.

    A TDT dump (model_kind tdt) gets one row per arc of its best path over the
    duration lattice, tokens and blanks in order: arc (0-based), kind (token or
    blank), position (the u the arc leaves: a token's 0-based position), token_id,
    token, frame (the frame the arc leaves: a token's emission frame), duration
    (frames the arc advances; a token's may be 0, a blank's is >= 1; the last
    blank lands on frame T), and for tokens expected_frame and frame_posterior
    (summed over durations); loss is the TDT loss.
    """
    from .analysis import align_fields

    reads = _inputs_of(inputs, utt_list)
    fmt = _output_format(fmt, output, reads)
    backend = _backend(device)
    with _selection(inputs, blank, utts, utt_list, output=output) as selected:
        code = _run_job(
            "align", selected, output=output, fmt=fmt, reads=reads,
            fields=lambda pairs: _with_file(
                align_fields(r.model_kind for r, _ in selected), selected),
            options={"--blank": blank, "--device": backend},
            shard=shard, resume=resume, quiet=quiet, backend=backend,
            produce=functools.partial(_align_records, backend=backend))
    if code:
        raise typer.Exit(code)


def _align_records(work, advance, *, backend):
    """One ``Record`` per utterance of ``work``: its token rows (none when its loss is
    not finite) and what the table-mode summary needs."""
    from .analysis import align_utterance
    from .distributed import Record

    for i, reader, ids, js in work:
        for j, (_, utt) in zip(js, _utterances([(reader, ids)]), strict=True):
            with _Utterance(reader.path, utt.info.utt_id) as one:
                aligned = align_utterance(reader, utt, backend=backend)
                one.report(aligned.problem)
            info = {"problem": aligned.problem, "where": one.where}
            if aligned.finite:
                info["summary"] = [aligned.utt_id, aligned.best_log_prob, aligned.loss,
                                   aligned.best_path_share]
            advance(1)
            yield Record((i, j), _tagged(aligned.rows(), reader), info)


class _AlignTally:
    """``align``'s rows written in order; the table-mode summary (``_ScoreTally``)."""

    def __init__(self, several: bool, report: bool, fmt: str) -> None:
        self.report, self.fmt = report, fmt
        self.summaries: list = []
        self.problems = 0

    def add(self, rec, out) -> None:
        if rec.info.get("problem"):
            self.problems += 1
            if self.report:
                print(f"rnntool: {rec.info['where']}: {rec.info['problem']}", file=sys.stderr)
        out.write(rec.rows)
        if rec.info.get("summary"):
            self.summaries.append(rec.info["summary"])

    def summary(self, quiet: bool) -> int:
        from .reader import show

        if self.fmt == "table" and not quiet:
            err = _stderr()
            for utt_id, best, loss, share in self.summaries:
                err.print(f"{show(utt_id)}: best path log P = {best:.4f}, all paths log P = "
                          f"{-loss:.4f} (loss {loss:.4f}); best path holds "
                          f"{share:.1%} of the probability", markup=False)
        return 1 if self.problems else 0


@app.command()
@command
def plot(
    inputs: Inputs,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-d", metavar="DIR",
                                          help="Directory for the PNGs.")],
    device: Device = "auto",
    blank: Blank = None,
    utts: Utts = None,
    utt_list: UttList = None,
    quiet: Quiet = False,
) -> None:
    """Heatmaps of each utterance's T x (U+1) lattice, as OUT_DIR/<utt_id>.png
    (OUT_DIR/<file stem>/<utt_id>.png with several inputs; <stem>~<k> for the k-th
    of inputs that share a stem).

    Two panels: log node occupancy with the Viterbi path over it, and the
    per-node gradient norm ||d loss / d logits[t, u, :]||. For a TDT dump the
    path is drawn arc by arc, a dot at each node it visits: a blank of duration
    d is a horizontal segment d frames long, a token a diagonal (vertical for
    d = 0), the last blank ending at frame T; the norm is over the V + D logits (a
    TDT lattice dump stores too little for it: the first panel alone). Long utterances are
    reduced by block maxima (the figure says so). An utterance whose loss is not
    finite gets no PNG: one line on stderr names it, the others are still drawn,
    and the exit code is 1 (also for a loss below 0 beyond rounding, drawn).
    """
    from .analysis import align_utterance
    from .plots import save_png
    from .reader import show

    _check_out_dir(out_dir)
    backend = _backend(device)
    with _selection(inputs, blank, utts, utt_list) as selected:
        _make_out_dir(out_dir)
        # A PNG must never replace an input (a dump named like one, in the out dir).
        reads = _inputs_of(inputs, utt_list) + _linked(r for r, _ in selected)
        n = problems = 0
        png_dir = _png_dirs(out_dir, selected)
        with _progress(quiet) as bar:
            task = bar.add_task("plotting", total=sum(len(ids) for _, ids in selected))
            for reader, utt in _utterances(selected, norms=True):
                with _Utterance(reader.path, utt.info.utt_id) as one:
                    aligned = align_utterance(reader, utt, backend=backend, grad_norms=True)
                    one.report(aligned.problem)
                    if aligned.finite:
                        save_png(png_dir(reader), aligned, inputs=reads)
                        n += 1
                problems += aligned.problem is not None
                bar.advance(task)
    if not quiet:
        _stderr().print(f"wrote {n} PNG{'' if n == 1 else 's'} to {show(out_dir)}",
                        markup=False)
    if selected.report_empty() or problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- compact
@app.command()
@command
def compact(
    input: Annotated[Path, typer.Argument(
        metavar="FILE", help="A full-logit HDF5 dump (keyed or padded layout).")],
    output: Annotated[str, typer.Option(
        "-o", "--output", metavar="FILE", help="The lattice dump to write (atomically).")],
    device: Device = "auto",
    blank: Blank = None,
    utts: Utts = None,
    utt_list: UttList = None,
    batch_mb: Annotated[int, typer.Option(
        "--batch-mb", metavar="MIB", help="Memory budget of one padded batch of logits, "
        "MiB.")] = 64,
    dtype: Annotated[str | None, typer.Option(
        "--dtype", metavar="DTYPE", help="float32|float64: the lattice arrays' type at most "
        "(default float64: float64 for float64 logits, float32 otherwise, so scores are "
        "the same bits as the full dump's; float32 rounds float64 logits' arrays).")] = None,
    compression: Annotated[str, typer.Option("--compression", metavar="FILTER",
                                             help="none|lzf|gzip.")] = "none",
    quiet: Quiet = False,
) -> None:
    """Convert a full dump into a lattice dump, about V/6 times smaller for V tokens.

    Per utterance and lattice node, the lattice dump keeps the blank and
    next-label log-probs and log of the sum of p_v^2 over the other tokens: what
    score, align, timestamps, plot and inspect need (grad-check needs the logits). Stage 1 of
    the engine runs on --device, one batch at a time; stored losses, texts and
    the vocab (and the frame shift) carry over. The output appears only when complete.
    A TDT dump (model_kind tdt) keeps the blank and next-label log-probs and the D
    duration log-probs per node instead (no gradient-norm panel in plot).
    """
    from .compact import compact_dump, lattice_writer_for
    from .reader import show

    if output == "-":
        raise fail("-o -: a lattice dump is an HDF5 file; give a file name")
    if batch_mb < 0:
        raise fail(f"--batch-mb {batch_mb} must be 0 or more (MiB; 0: one utterance a batch)")
    if dtype not in (None, "float32", "float64"):
        raise fail(f"--dtype {dtype!r} is not one of float32, float64")
    if compression not in ("none", "lzf", "gzip"):
        raise fail(f"--compression {compression!r} is not one of none, lzf, gzip")
    backend = _backend(device)
    with (_selection([input], blank, utts, utt_list, output=output) as selected,
          _progress(quiet) as bar):
        ((reader, ids),) = selected
        if reader.kind == "lattice":
            raise fail(f"{reader.name}: is already a lattice dump")
        if selected.report_empty():  # nothing to convert: no empty lattice dump either
            raise typer.Exit(1)
        task = bar.add_task("compacting", total=len(ids))
        with lattice_writer_for(reader, output, lattice_dtype=dtype, backend=backend,
                                compression=None if compression == "none" else compression
                                ) as writer:
            try:
                n = compact_dump(reader, ids, writer, backend=backend,
                                 budget_bytes=batch_mb << 20,
                                 on_batch=lambda k: bar.advance(task, k))
            except (ValueError, TypeError) as e:  # the writer names the utterance
                raise fail(f"{reader.name}: {e}") from None
        size_in = reader.file_size()
    if not quiet:
        size_out = os.path.getsize(output)
        _stderr().print(f"{n} utterances: {show(input)} ({size_in / 2**20:.2f} MiB) -> "
                        f"{show(output)} ({size_out / 2**20:.2f} MiB, "
                        f"{size_in / max(size_out, 1):.0f}x smaller)", markup=False)


def _check_out_dir(out_dir: Path) -> None:
    """Exit 2 when OUT_DIR exists and is not a directory (or is a dangling link)."""
    from .reader import show

    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise fail(f"{show(out_dir)}: exists and is not a directory"
                   + (" (a symbolic link to nothing)" if not out_dir.exists() else ""))


def _make_out_dir(out_dir: Path) -> None:
    """OUT_DIR made with its parents (exit 2 if it cannot be)."""
    from .reader import show

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise fail(f"{show(out_dir)}: cannot create the directory ({e.strerror})") from None


def _png_dir(out_dir: Path, reader, selected) -> Path:
    """Where an input's PNGs (TextGrids) go: OUT_DIR, or with several inputs
    OUT_DIR/<file stem>/ (the same utterance id in two dumps gets two files); inputs
    that share a stem (exp1/dev.h5, exp2/dev.h5) get OUT_DIR/<stem>~<k>/, k their
    1-based place among the inputs, instead of overwriting each other's files
    (``confined_name`` writes a "~" as %7E, so no other input's directory is named so)."""
    if not selected.several:
        return out_dir
    from .output import confined_name

    readers = [r for r, _ in selected]
    stems = [confined_name(Path(r.path).stem) for r in readers]
    k = next(i for i, r in enumerate(readers) if r is reader)
    name = stems[k] if stems.count(stems[k]) == 1 else f"{stems[k]}~{k + 1}"
    sub = out_dir / name
    try:
        sub.mkdir(exist_ok=True)
    except OSError as e:
        raise fail(f"{_line(str(sub))}: cannot create the directory ({e.strerror})") from None
    return sub


def _png_dirs(out_dir: Path, selected):
    """``reader -> _png_dir(out_dir, reader, selected)``, each input's directory worked
    out (and made) once, when its first file is written, not once per utterance."""
    made: dict[int, Path] = {}

    def dir_of(reader) -> Path:
        if id(reader) not in made:
            made[id(reader)] = _png_dir(out_dir, reader, selected)
        return made[id(reader)]

    return dir_of


# --------------------------------------------------------------------------- grad-check
@app.command("grad-check")
@command
def grad_check(
    inputs: Annotated[list[Path], typer.Argument(
        metavar="FILE", help="HDF5 full dumps (keyed or padded layout; a lattice dump holds "
        "no logits).")],
    output: Output = None,
    fmt: Format = None,
    device: Device = "auto",
    blank: Blank = None,
    utts: Utts = None,
    utt_list: UttList = None,
    samples: Annotated[int, typer.Option(
        "--samples", metavar="N", help="Finite-difference probes per utterance.")] = 20,
    rtol: Annotated[float, typer.Option("--rtol", metavar="X", help="Relative tolerance.")] = 1e-3,
    atol: Annotated[float, typer.Option("--atol", metavar="X", help="Absolute tolerance.")] = 1e-5,
    reference: Annotated[bool | None, typer.Option(
        "--reference/--no-reference",
        help="Also check against the slow, independent float64 reference (default: only "
        "when (T*(U+1))^2*V <= 2.5e8, a few seconds).")] = None,
    quiet: Quiet = False,
) -> None:
    """Check each utterance's gradient: the engine against itself in float64, finite
    differences, and the float64 reference when small.

    Per utterance, one row per check: the engine in the dump's dtype against the
    engine in float64 on the same values (every entry); the float64 gradient against
    central finite differences of the float64 loss (--samples entries, step 1e-4;
    the row's atol includes the differences' own error bound); against the slow,
    independent float64 reference when (T*(U+1))^2*V <= 2.5e8 or --reference; the
    dump's stored `grads` (a trainer's gradient of that utterance's loss) against
    the reference (or the float64 engine); CPU against CUDA when both run here. A
    row passes when worst_ratio = max |a - b| / (atol + rtol * |b|) <= 1. Exit 1
    if any fails; a failure within float32 rounding of a long lattice gets a note
    on stderr. With several inputs a file column first. An utterance whose loss is
    not finite is not checked (no rows): one line on stderr names it, the others
    are still checked, and the exit code is 1 (also for a loss below 0 beyond
    rounding, whose checks are written). Lattice dumps hold no logits: exit 2. A TDT
    dump (model_kind tdt) is checked with the TDT loss over each node's V + D logits
    (tokens and durations), against tdt_reference_gradients.
    """
    from .devices import cuda_usable
    from .gradcheck import GRADCHECK_FIELDS, check_utterance
    from .reader import show

    reads = _inputs_of(inputs, utt_list)
    fmt = _output_format(fmt, output, reads)
    if samples < 0 or not (math.isfinite(rtol) and rtol >= 0) or not (
            math.isfinite(atol) and atol >= 0):
        raise fail("--samples, --rtol and --atol must be finite and not negative")
    backend = _backend(device)
    total = failed = problems = 0
    utterances = set()
    specs = dict.fromkeys(("max_abs_err", "max_rel_err", "atol", "rtol"), ".3e")
    specs["worst_ratio"] = ".3g"
    with _selection(inputs, blank, utts, utt_list, output=output) as selected:
        for reader, _ in selected:
            if reader.kind == "lattice":
                raise fail(f"{reader.name}: is a lattice dump, which holds no logits; "
                           "grad-check needs the full logits (a dump written with "
                           "DumpWriter's default kind=\"full\")")
        compare_cuda = backend == "cpu" and cuda_usable()
        with (_progress(quiet) as bar,
              _rows_out(output, reads, _with_file(GRADCHECK_FIELDS, selected), fmt,
                        f"Gradient checks (atol {atol:g}, rtol {rtol:g})", specs) as out):
            task = bar.add_task("checking", total=sum(len(ids) for _, ids in selected))
            for reader, utt in _utterances(selected, with_grads=True):
                name = show(utt.info.utt_id)
                with _Utterance(reader.path, utt.info.utt_id) as one:
                    checked = check_utterance(
                        reader, utt, backend=backend, samples=samples, rtol=rtol, atol=atol,
                        compare_cuda=compare_cuda, reference=reference,
                        on_step=lambda step, n=name: bar.update(task,
                                                                description=f"{n}: {step}"))
                    one.report(checked.problem)
                problems += checked.problem is not None
                out.write(_tagged(checked.rows, reader))
                bar.advance(task)
                for r in checked.rows:
                    total += 1
                    utterances.add((r["_file"], r["utt_id"]))
                    if r["result"] != "FAIL":
                        continue
                    failed += 1
                    where = f"rnntool: {_line(r['_file'])}: utterance {name}"
                    print(f"{where}: FAIL {r['check']}: worst ratio {r['worst_ratio']:.3g} "
                          f"(max abs err {r['max_abs_err']:.3g}, max rel err "
                          f"{r['max_rel_err']:.3g})", file=sys.stderr)
                    if r.get("_precision_limited"):
                        print(f"{where}: note: {_line(r['_note'])}", file=sys.stderr)
    if not quiet:
        _stderr().print(f"{total - failed}/{total} checks passed on {len(utterances)} "
                        f"utterances (atol {atol:g}, rtol {rtol:g})", markup=False)
    if selected.report_empty() or failed or problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- timestamps
TIMESTAMP_FORMATS = ("tsv", "csv", "jsonl", "json", "table", "ctm", "lhotse", "textgrid")


@app.command("timestamps")
@command
def timestamps_cmd(
    inputs: Inputs,
    output: Output = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", "-f", metavar="FORMAT",
        help="tsv|csv|jsonl|json|table (every field), ctm (SCTK), lhotse (supervision "
        "JSONL), textgrid (Praat, into --out-dir) (default: table on a terminal, tsv "
        "otherwise).")] = None,
    device: Device = "auto",
    blank: Blank = None,
    utts: Utts = None,
    utt_list: UttList = None,
    frame_shift: Annotated[float | None, typer.Option(
        "--frame-shift", metavar="SECONDS",
        help="Seconds per logit frame (overrides the dump's frame_shift).")] = None,
    unit: Annotated[str, typer.Option(
        "--unit", metavar="UNIT", help="word|token: what a row, CTM line or item "
        "is.")] = "word",
    word_sep: Annotated[str | None, typer.Option(
        "--word-sep", metavar="TOKEN", help="Tokens group into words at this separator "
        "token (default: at SentencePiece's \u2581 when the vocab has it).")] = None,
    window: Annotated[int, typer.Option(
        "--window", metavar="K", help="Frames each side of the Viterbi frame for the window "
        "posterior (the confidence).")] = 2,
    aggregate: Annotated[str, typer.Option(
        "--aggregate", metavar="HOW", help="min|mean|prod|max: a word's confidence from its "
        "tokens'.")] = "min",
    channel: Annotated[str, typer.Option(
        "--channel", metavar="CHAN", help="The CTM channel field.")] = "1",
    out_dir: Annotated[Path | None, typer.Option(
        "--out-dir", "-d", metavar="DIR", help="Directory for the TextGrids (--format "
        "textgrid).")] = None,
    ref: Annotated[Path | None, typer.Option(
        "--ref", metavar="REF.ctm", help="Reference word times (CTM): report each word's "
        "start and end offsets (emission delay).")] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE.json", help="With --ref: write the delay statistics "
        "here as JSON (with the times: neither is written if either cannot be; with "
        "--shard K/N give it to 'rnntool merge').")] = None,
    shard: Shard = None,
    resume: Resume = False,
    quiet: Quiet = False,
) -> None:
    """Token and word times in seconds, confidences, and emission delay against a
    reference CTM.

    A token starts at the frame where the Viterbi path of the transcript emits it
    and ends one frame later (start = frame x frame shift, end = (frame + 1) x frame
    shift); expected_start is the posterior mean of its emission frame x frame
    shift. frame_posterior: P(emitted at the Viterbi frame); window_posterior:
    P(emitted within --window K frames of it), both from the lattice, in [0, 1]. A
    word (tokens grouped at SentencePiece's \u2581, at --word-sep, or one per token
    with --unit token) runs from its first token's start to its last token's end;
    its confidence is the --aggregate (min by default) of its tokens' window
    posteriors, frame_confidence of their frame posteriors. The frame shift is the
    dump's (root attribute frame_shift) or --frame-shift; without either, or
    outside 1e-6 to 60 seconds: exit 2. A TDT dump's token starts at the frame its
    arc leaves on the best path over the duration lattice and lasts max(duration, 1)
    frames.

    Formats: tsv/csv/jsonl/json/table, one row per word (per token with --unit
    token) with every field (and a file column first for several inputs); ctm:
    `utt_id channel start duration word confidence`, sorted by utterance then
    start (start and end rounded, duration their difference); lhotse: one
    SupervisionSegment per line with an alignment of word and token items
    [symbol, start, duration, score]; for both, an utterance id in two inputs is
    exit 2. textgrid: OUT_DIR/<utt_id>.TextGrid (OUT_DIR/<file stem>/... with
    several inputs) with tiers words and tokens.

    --ref REF.ctm: each word is matched with the reference word of the same
    utterance (the same words in order, ignoring case and Unicode normal forms,
    with times relative to the utterance: a word ending over 1 s after its end is
    refused; else exit 2 naming the utterance); rows gain ref_word, ref_start,
    ref_end and the offsets hypothesis - reference in ms of the start, end,
    expected start and expected end; count, mean, median, p90, min and max of
    each go to stderr (unless -q) and to --summary. An
    utterance whose loss is not finite gets no times: one line names it and the
    exit code is 1.

    Under torchrun, and with --shard K/N and --resume, as score (every format but
    textgrid, which is refused: give each process its own --utt-list instead);
    'rnntool merge' writes what one process writes, the CTM re-sorted, and with
    --ref the delay statistics of every share's offsets (the parts' merge takes
    --summary FILE.json; a --shard run does not).
    """
    from .output import check_writable
    from .reader import show
    from .timestamps import AGGREGATES, UNITS, check_times_frame_shift, read_ctm

    if fmt is None:
        from .output import default_format

        fmt = default_format(output)
    if fmt not in TIMESTAMP_FORMATS:
        raise fail(f"--format {fmt!r} is not one of {', '.join(TIMESTAMP_FORMATS)}")
    if unit not in UNITS:
        raise fail(f"--unit {unit!r} is not one of {', '.join(UNITS)}")
    if aggregate not in AGGREGATES:
        raise fail(f"--aggregate {aggregate!r} is not one of {', '.join(AGGREGATES)}")
    if window < 0:
        raise fail(f"--window {window} must be 0 or more (frames)")
    if word_sep is not None and unit == "token":
        raise fail("--word-sep groups tokens into words; it does not go with --unit token")
    if frame_shift is not None:
        try:
            frame_shift = check_times_frame_shift(frame_shift, "--frame-shift")
        except (TypeError, ValueError) as e:
            raise fail(str(e)) from None
    if not channel or len(channel.split()) != 1 or channel != channel.strip():
        raise fail(f"--channel {channel!r} cannot be a CTM field (empty, or it holds "
                   "whitespace)")
    if fmt == "textgrid":
        if out_dir is None:
            raise fail("--format textgrid writes one file per utterance: give --out-dir DIR")
        if output is not None:
            raise fail("--format textgrid writes into --out-dir, not -o")
    elif out_dir is not None:
        raise fail("--out-dir goes with --format textgrid; use -o for the other formats")
    if summary is not None:
        if ref is None:
            raise fail("--summary writes the delay statistics of --ref; give --ref REF.ctm")
        if summary == "-":
            raise fail("--summary needs a file name (stdout carries the times)")
        if output not in (None, "-") and _same_path(summary, output):
            raise fail(f"{_line(summary)}: given as both -o and --summary")
    tr = _torchrun_or_none()
    launched = all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if fmt == "textgrid" and (shard is not None or resume or launched):
        raise fail("--format textgrid is not sharded (--shard, --resume, torchrun): its "
                   "files need no merge; give each process its own --utt-list instead")
    if summary is not None and shard is not None:
        raise fail("--summary needs every share's offsets: give it to 'rnntool merge', not "
                   "to a --shard K/N run")
    if tr is not None and tr.rank != 0:
        summary = None  # rank 0 merges, and writes it
    reads = _inputs_of(inputs, utt_list) + ([str(ref)] if ref is not None else [])
    check_writable(output, reads)
    check_writable(summary, reads)
    backend = _backend(device)
    refs = None
    if ref is not None:
        try:
            refs = read_ctm(ref)
        except ValueError as e:
            raise fail(str(e)) from None
    ref_name = None if ref is None else show(ref)
    # What changes the rows: a part made with other values is not resumed (the dumps'
    # own frame_shift is part of their identity, their size and modification time).
    options = {"--blank": blank, "--device": backend, "--frame-shift": frame_shift,
               "--unit": unit, "--word-sep": word_sep, "--window": window,
               "--aggregate": aggregate, "--channel": channel, "--ref": ref_name,
               "--ref contents": None if ref is None else _sha256_of(ref)}
    share = _share_for_plans(shard, tr)
    # The summary file is opened (its temporary file made) before any work, and
    # written before the times are committed: one that cannot be written leaves no
    # times behind.
    with (_selection(inputs, blank, utts, utt_list, output=output) as selected,
          _summary_output(summary, reads) as summary_out):
        _one_file_per_id(selected, fmt)
        if share is not None:  # a share checks its own utterances only
            from .distributed import plan_work

            mine = plan_work(selected, share).pairs()
        else:
            mine = selected
        plans = {id(reader): _times_plan(reader, ids, frame_shift, unit, word_sep, refs,
                                         ref_name, quiet, fmt)
                 for reader, ids in mine}
        if fmt == "textgrid":
            problems = _write_textgrids(
                selected, plans, out_dir=out_dir, reads=reads, backend=backend, unit=unit,
                window=window, aggregate=aggregate, refs=refs, ref_name=ref_name,
                quiet=quiet, summary_out=summary_out)
            code = max(int(selected.report_empty()), int(problems > 0))
        else:
            fields = _with_file(_times_fields(unit, refs is not None), selected)
            code = _run_job(
                "timestamps", selected, output=output, fmt=fmt, reads=reads,
                fields=lambda pairs: fields, options=options, shard=shard, resume=resume,
                quiet=quiet, backend=backend,
                produce=functools.partial(
                    _times_records, plans=plans, backend=backend, unit=unit, window=window,
                    aggregate=aggregate, refs=refs, ref_name=ref_name, fmt=fmt,
                    channel=channel, several=selected.several),
                tally_args={"options": options, "summary_out": summary_out})
        if code >= 2:
            raise typer.Exit(code)  # a torchrun job failed: no --summary either
    if code:
        raise typer.Exit(code)


def _torchrun_or_none():
    """``distributed.torchrun_env()``, None for a broken environment (``_run_job`` then
    says what is wrong)."""
    from .distributed import ShareError, torchrun_env

    try:
        return torchrun_env()
    except ShareError:
        return None


def _share_for_plans(shard: str | None, tr):
    """The share this process will run (None: every utterance, or a bad --shard that
    ``_run_job`` refuses), so that its checks read only its own utterances."""
    from .distributed import parse_share

    if tr is not None:
        return None if shard is not None else tr.share
    if shard is None:
        return None
    try:
        return parse_share(shard)
    except ValueError:
        return None


def _sha256_of(path) -> str:
    """The SHA-256 of a file's bytes (a part remembers the --ref it was made with)."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise fail(f"{_line(str(path))}: cannot read ({e.strerror})") from None
    return h.hexdigest()


def _times_plan(reader, ids, frame_shift, unit, word_sep, refs, ref_name, quiet,
                fmt) -> dict:
    """What ``timestamps`` needs of one input before any output: its frame shift
    (--frame-shift, else the dump's: exit 2 without either, or for one out of
    range), its word grouping, and from the labels alone, so that a problem is
    exit 2 before anything is written: with --ref every selected utterance's words
    checked against the reference's (and the reference's times against the
    utterance's duration); for a CTM every id and word checked as a CTM field."""
    from .reader import show
    from .timestamps import check_ctm_field, check_times_frame_shift, check_words, grouping_for

    shift = frame_shift if frame_shift is not None else reader.frame_shift
    if shift is None:
        raise fail(f"{reader.name}: no frame shift: the dump has no root attribute "
                   "frame_shift (DumpWriter(..., frame_shift=SECONDS)); give --frame-shift "
                   "SECONDS")
    if frame_shift is None:
        try:
            shift = check_times_frame_shift(shift, f"{reader.name}: attribute frame_shift")
        except ValueError as e:
            raise fail(f"{e}; give --frame-shift SECONDS") from None
    try:
        grouping = grouping_for(reader.vocab, unit, word_sep, blank=reader.blank,
                                vocab_size=reader.vocab_size)
    except ValueError as e:
        raise fail(f"{reader.name}: --word-sep: {e}") from None
    if unit == "word" and grouping == "token" and not quiet:
        why = "has no vocab" if reader.vocab is None else "vocab has no \u2581 tokens"
        print(f"rnntool: {_line(reader.name)}: the dump {why} and no --word-sep was given: "
              "one word per token", file=sys.stderr)
    if refs is not None or fmt == "ctm":
        for utt_id in ids:
            info = reader.info(utt_id)
            words = _planned_words(reader, reader.labels(utt_id, info), unit, grouping,
                                   word_sep)
            try:
                if fmt == "ctm":
                    where = f"{reader.name}: utterance {show(utt_id)}:"
                    check_ctm_field(utt_id, f"{where} the id")
                    for w in words:
                        check_ctm_field(w, f"{where} {unit}")
                if refs is not None:
                    check_words(utt_id, words, refs.get(utt_id), ref_name, info.T * shift)
            except ValueError as e:
                raise fail(str(e)) from None
    return {"frame_shift": shift, "grouping": grouping, "word_sep": word_sep}


def _planned_words(reader, labels, unit, grouping, word_sep) -> list[str]:
    """The words (tokens for --unit token) ``timestamps`` will give an utterance with
    these labels, as ``times_of`` groups them."""
    from .timestamps import word_groups

    names = ([reader.vocab[int(t)] for t in labels] if reader.vocab
             else [str(int(t)) for t in labels])
    return names if unit == "token" else [w for w, _ in word_groups(names, grouping, word_sep)]


def _one_file_per_id(selected, fmt: str) -> None:
    """A CTM line names no file and lhotse's supervision ids are unique: with several
    inputs, an utterance id in two of them would merge two utterances into one (exit 2)."""
    from .reader import show

    if fmt not in ("ctm", "lhotse") or not selected.several:
        return
    seen: dict[str, str] = {}
    for reader, ids in selected:
        for utt_id in ids:
            if utt_id in seen:
                why = ("a CTM line names no file" if fmt == "ctm"
                       else "lhotse supervision ids are unique")
                raise fail(f"utterance {show(utt_id)!r} is in both {seen[utt_id]} and "
                           f"{reader.name}: {why}; write one output per input")
            seen[utt_id] = reader.name


def _same_path(a: str, b: str) -> bool:
    """Whether two output paths name one file (through symbolic or hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def _summary_output(summary: str | None, reads: list[str]):
    """The open --summary file (``open_output``: atomic), or None without one."""
    from .output import open_output

    if summary is None:
        yield None
        return
    with open_output(summary, reads) as f:
        yield f


def _times_fields(unit: str, with_ref: bool) -> list[str]:
    """The columns of ``timestamps``' rows (before a ``file`` column)."""
    from .timestamps import DELAY_FIELDS, TOKEN_FIELDS, WORD_FIELDS

    fields = TOKEN_FIELDS if unit == "token" else WORD_FIELDS
    return list(fields) + (list(DELAY_FIELDS) if with_ref else [])


def _timed(work, *, plans, backend, window, aggregate):
    """``(i, j, reader, times, aligned, where)`` for each utterance of ``work`` (a
    ``distributed.Work``), aligned, its problem line printed as it comes."""
    from .analysis import align_utterance
    from .timestamps import times_of

    for i, reader, ids, js in work:
        plan = plans[id(reader)]
        for j, (_, utt) in zip(js, _utterances([(reader, ids)]), strict=True):
            with _Utterance(reader.path, utt.info.utt_id) as one:
                aligned = align_utterance(reader, utt, backend=backend)
                one.report(aligned.problem)
            times = times_of(aligned, frame_shift=plan["frame_shift"],
                             text=utt.info.attrs.get("text"), grouping=plan["grouping"],
                             word_sep=plan["word_sep"], window=window, aggregate=aggregate)
            yield i, j, reader, times, aligned, one.where


def _times_records(work, advance, *, plans, backend, unit, window, aggregate, refs, ref_name,
                   fmt, channel, several):
    """One ``Record`` per utterance of ``work``, its rows as ``fmt`` needs them: row
    dicts (tsv, csv, jsonl, json, table), ``[start, line]`` CTM items (``info["utt_id"]``
    beside them: the tally sorts every utterance's lines), or lhotse JSON lines;
    ``info["delays"]``: the --ref offsets (``delay_rows``), for the statistics. An
    utterance whose loss is not finite has no rows."""
    import json

    from .distributed import Record
    from .timestamps import ctm_items, delay_rows, lhotse_supervision, token_rows, word_rows

    for i, j, reader, times, aligned, where in _timed(
            work, plans=plans, backend=backend, window=window, aggregate=aggregate):
        info: dict = {"problem": aligned.problem, "where": where}
        rows: list = []
        if times.finite:
            delays = None
            if refs is not None:
                delays = info["delays"] = delay_rows(times, refs.get(times.utt_id), ref_name,
                                                     unit)
            if fmt == "ctm":
                info["utt_id"] = times.utt_id
                rows = [[start, line] for start, line in ctm_items(times, unit, channel)]
            elif fmt == "lhotse":
                custom = {"file": reader.name} if several else None
                rows = [json.dumps(lhotse_supervision(times, unit, custom), ensure_ascii=False)]
            else:
                rows = token_rows(times) if unit == "token" else word_rows(times)
                for r, d in zip(rows, delays or [{}] * len(rows), strict=True):
                    r.update(d, file=reader.name)
        advance(1)
        yield Record((i, j), rows, info)


class _TimesTally:
    """``timestamps``' output from its records in single-process order (``_jobs``):
    rows streamed (tsv, csv, jsonl; json and table at the end), lhotse lines streamed,
    CTM lines held and written at the end sorted by utterance, then start, then
    arrival, exactly as one process sorts them; with --ref the delay statistics from
    every record's offsets, printed and written to the open --summary file
    (``summary_out``) before the output is committed. ``options``: the run's (the
    parts' fingerprint's): --unit and --ref name the report."""

    def __init__(self, several: bool, report: bool, fmt: str, options: dict,
                 summary_out=None) -> None:
        self.report, self.fmt, self.summary_out = report, fmt, summary_out
        self.unit, self.ref_name = options["--unit"], options.get("--ref")
        self.problems = 0
        self.delays: list[dict] = []
        self.held: list[tuple] = []

    def add(self, rec, out) -> None:
        if rec.info.get("problem"):
            self.problems += 1
            if self.report:
                print(f"rnntool: {rec.info['where']}: {rec.info['problem']}", file=sys.stderr)
        self.delays += rec.info.get("delays") or []
        if not rec.rows:
            return
        if self.fmt == "ctm":
            utt_id = rec.info["utt_id"]
            self.held.extend((utt_id, start, len(self.held), line) for start, line in rec.rows)
        elif self.fmt == "lhotse":
            out.writelines(line + "\n" for line in rec.rows)
            out.flush()
        else:
            out.write(rec.rows)

    @contextlib.contextmanager
    def sink(self, output, reads, fields, quiet):
        """The output (``open_output``: committed when the block succeeds)."""
        from .output import RowWriter, open_output

        with open_output(output, reads) as out:
            if self.fmt in ("ctm", "lhotse"):
                yield out
            else:
                rows = RowWriter(out, fields, self.fmt, title="Token times"
                                 if self.unit == "token" else "Word times")
                yield rows
            if self.ref_name is not None:
                _delay_report(self.delays, self.summary_out, self.ref_name, self.unit, quiet)
            if self.fmt == "ctm":
                self.held.sort(key=lambda h: h[:3])
                out.writelines(h[3] + "\n" for h in self.held)
            elif self.fmt != "lhotse":
                rows.close()

    def summary(self, quiet: bool) -> int:
        return 1 if self.problems else 0


def _write_textgrids(selected, plans, *, out_dir, reads, backend, unit, window, aggregate,
                     refs, ref_name, quiet, summary_out) -> int:
    """Align each selected utterance and write its TextGrid (``OUT_DIR/<utt_id>.TextGrid``,
    atomically, as it comes; ``_png_dir``); with --ref the delay report once all are
    written. Returns the number of utterances with a problem."""
    from .output import atomic_file, confined_name
    from .timestamps import delay_rows, textgrid

    _check_out_dir(out_dir)
    _make_out_dir(out_dir)
    inputs = reads + _linked(r for r, _ in selected)
    delays, problems = [], 0
    textgrid_dir = _png_dirs(out_dir, selected)
    with _progress(quiet) as bar:
        task = bar.add_task("timing", total=sum(len(ids) for _, ids in selected))
        for _, _, reader, times, aligned, _ in _timed(
                _all_work(selected), plans=plans, backend=backend, window=window,
                aggregate=aggregate):
            problems += aligned.problem is not None
            if times.finite:
                if refs is not None:
                    delays += delay_rows(times, refs.get(times.utt_id), ref_name, unit)
                dest = textgrid_dir(reader) / confined_name(times.utt_id, ".TextGrid")
                with atomic_file(dest, "wb", inputs=inputs) as f:
                    f.write(textgrid(times).encode("utf-8"))
            bar.advance(task)
    if refs is not None:
        _delay_report(delays, summary_out, ref_name, unit, quiet)
    return problems


def _delay_report(delays, summary_out, ref_name, unit, quiet) -> None:
    """The --ref statistics: on stderr (unless -q) and, into ``summary_out`` (the open
    --summary file) if any, as JSON."""
    from .timestamps import SUMMARY_KEYS, delay_summary

    stats = delay_summary(delays)
    if not quiet:
        err = _stderr()
        err.print(f"emission delay against {ref_name}: {stats['count']} {unit}s "
                  "(hypothesis - reference, ms)", markup=False)
        for key in SUMMARY_KEYS:
            s = stats[key]
            if s is not None:
                # round(..) + 0.0: no "-0.0" for a float-noise offset of -1e-13 ms
                s = {k: round(v, 1) + 0.0 for k, v in s.items()}
                err.print(f"  {key.removesuffix('_offset_ms').replace('_', ' ')} offset: "
                          f"mean {s['mean']:.1f}, median {s['median']:.1f}, p90 "
                          f"{s['p90']:.1f}, min {s['min']:.1f}, max {s['max']:.1f}",
                          markup=False)
    if summary_out is not None:
        import json

        json.dump({"ref": ref_name, "unit": unit, **stats}, summary_out, indent=1,
                  allow_nan=False)
        summary_out.write("\n")


# --------------------------------------------------------------------------- merge
_LINE_FORMATS = ("ctm", "lhotse")  # timestamps' formats whose parts hold finished lines


@app.command()
@command
def merge(
    parts: Annotated[list[Path], typer.Argument(
        metavar="PART", help="The N part files of one run: FILE.part-K-of-N, K = 0..N-1.")],
    output: Output = None,
    fmt: Annotated[str | None, typer.Option(
        "--format", "-f", metavar="FORMAT",
        help="tsv|csv|jsonl|json|table (default: the run's own; timestamps' ctm and lhotse "
        "parts merge only into their own format, and row parts never into ctm or lhotse)."
        )] = None,
    summary: Annotated[str | None, typer.Option(
        "--summary", metavar="FILE.json", help="timestamps --ref parts: write the delay "
        "statistics of every share's offsets here as JSON (as 'timestamps --summary').")
        ] = None,
    quiet: Quiet = False,
) -> None:
    """Merge the part files of a sharded run (score, align or timestamps with --shard
    K/N) into the output one process would have written, byte for byte, in the same
    row order (timestamps' CTM sorted across the shares as one process sorts it).

    The parts must be complete and all of one run (the same inputs, unchanged between
    the shards' runs, and the same options): a missing, repeated, incomplete or
    foreign part is one line and exit 2, and nothing is written. The summary and the
    lines naming problem utterances go to stderr as the command prints them (for
    timestamps --ref, the delay statistics over every share's offsets, also to
    --summary); exit 1 as it would (an impossible loss, a bad utterance skipped, an
    input with no utterances). The parts are left in place.
    """
    from .distributed import check_parts, merged_fields, merged_records
    from .output import FORMATS, check_writable

    paths = [str(p) for p in parts]
    checked = check_parts(paths)
    fp = checked[0].header["fingerprint"]
    jobs = _jobs()
    command = fp.get("command")
    if command not in jobs:
        raise fail(f"{paths[0]}: parts of 'rnntool {command}' cannot be merged "
                   "by this rnntool")
    title, specs, tally_class, _ = jobs[command]
    tally_args: dict = {}
    if command == "timestamps":
        options = fp.get("options") or {}
        # ctm and lhotse parts hold finished lines, row parts hold rows: neither becomes
        # the other, so a format change into or out of ctm/lhotse is refused.
        own = fp["format"]
        if fmt is not None and fmt != own and (own not in FORMATS or fmt in _LINE_FORMATS):
            into = own if own not in FORMATS else "|".join(FORMATS)
            raise fail(f"{paths[0]}: parts of 'rnntool timestamps --format {own}' merge "
                       f"into {into}, not {fmt} (rerun timestamps with --format {fmt})")
        tally_args["options"] = options
        if summary is not None and options.get("--ref") is None:
            raise fail(f"--summary writes the delay statistics of --ref; {paths[0]} was "
                       "made without --ref")
    elif summary is not None:
        raise fail(f"--summary goes with the parts of 'rnntool timestamps --ref', not "
                   f"'rnntool {command}'")
    fmt = fmt or fp["format"]
    reads = paths + [str(x["path"]) for x in fp["inputs"]]
    if fmt in FORMATS or command != "timestamps":
        fmt = _output_format(fmt, output, reads)
    else:  # the parts' own ctm or lhotse
        check_writable(output, reads)
    if summary is not None:
        if summary == "-":
            raise fail("--summary needs a file name (stdout carries the times)")
        if output not in (None, "-") and _same_path(summary, output):
            raise fail(f"{_line(summary)}: given as both -o and --summary")
        check_writable(summary, reads)
    with _summary_output(summary, reads) as summary_out:
        if command == "timestamps":
            tally_args["summary_out"] = summary_out
        tally = tally_class(several=fp["several"], report=True, fmt=fmt, **tally_args)
        with _tally_out(tally, output, reads, merged_fields(checked), fmt, title, specs,
                        quiet) as out:
            for rec in merged_records(checked):
                tally.add(rec, out)
    code = tally.summary(quiet)
    for name in fp["empty"]:
        print(f"rnntool: {_line(name)}: the dump holds no utterances", file=sys.stderr)
    if code or fp["empty"]:
        raise typer.Exit(1)


def main() -> None:
    """The console script: one line and exit 2 for a usage error (an unknown option, a
    missing argument, a bad value), never click's framed box."""
    # Default SIGPIPE handling would kill us mid-write with no cleanup; Python's
    # BrokenPipeError is caught per command instead. SIGINT, SIGTERM and SIGHUP
    # remove every temporary file and exit 130/143/129 with one line (cleanup.py).
    from . import cleanup

    cleanup.install_cli_handlers()
    # Typer vendors click privately; its UsageError is BadParameter's base class.
    usage_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
    command = typer.main.get_command(app)
    try:
        rc = command.main(prog_name="rnntool", standalone_mode=False)
    except usage_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `rnntool` or `rnntool score`
            print(e.ctx.get_help(), file=sys.stderr)
            sys.exit(2)
        where = e.ctx.command_path if e.ctx is not None else "rnntool"
        print(f"rnntool: error: {_line(e.format_message())} (see '{where} --help')",
              file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("rnntool: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


def _plain_argument_types() -> None:
    """Help shows an argument by its metavar alone (``FILE``), not with Typer's Python
    type (``<list[Path]>``), which means nothing to a shell user."""
    from typer.core import TyperArgument

    shown = TyperArgument.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.metavar is not None else shown(self, ctx)

    usage = TyperArgument._usage_display_name

    def usage_display_name(self):  # FILE..., not Typer's {FILE}...
        if self.metavar is None:
            return usage(self)
        return self.metavar + ("..." if self.nargs != 1 else "")

    TyperArgument.display_type_rich = display_type_rich
    TyperArgument._usage_display_name = usage_display_name


_plain_argument_types()
