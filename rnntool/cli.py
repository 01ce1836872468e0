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
    help="RNN-Transducer loss: score dumped logits, check gradients, see alignments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
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
    except (DumpError, OutputError, ValueError, TypeError, OSError, RuntimeError) as e:
        if os.environ.get("RNNTOOL_DEBUG"):
            raise
        raise fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None


class _Utterance:
    """Processing one utterance: its warnings are recorded, and its problems reported.

    ``check(loss, ...)`` prints one line naming file and utterance when the loss
    cannot be true (``score.loss_problem``) and says whether the utterance's
    results mean anything (False for a non-finite loss). On leaving, warnings of
    an utterance with a problem are dropped (consequences of it); the engine's
    own ``rnnt_loss:`` warnings too (they name a batch index, and the CLI checks
    the same values itself); any other becomes one line naming the utterance.
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
        self._cm.__exit__(exc_type, exc, tb)
        if exc_type is None and self.problem is None:
            for message in _unique(w for w in self._caught
                                   if not str(w.message).startswith("rnnt_loss: ")):
                print(f"rnntool: {self.where}: warning: {_line(message)}", file=sys.stderr)

    def check(self, loss: float, T: int, U: int, float64: bool = False,
              input_eps: float = 0.0) -> bool:
        from .score import loss_problem

        self.problem = loss_problem(loss, T, U, float64, input_eps)
        if self.problem is not None:
            print(f"rnntool: {self.where}: {self.problem}", file=sys.stderr)
        return math.isfinite(loss)


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
    """RNN-Transducer loss: score dumped logits, check gradients, see alignments."""


# --------------------------------------------------------------------------- shared options
Inputs = Annotated[list[Path], typer.Argument(help="HDF5 dumps (keyed or padded layout).")]
Output = Annotated[
    str | None, typer.Option("-o", "--output", help="Write here (atomically); '-' = stdout.")
]
Format = Annotated[
    str | None,
    typer.Option("--format", "-f", help="tsv|csv|jsonl|json|table (default: table on a "
                 "terminal, tsv otherwise)."),
]
Device = Annotated[str, typer.Option("--device", help="auto|cpu|cuda.")]
Blank = Annotated[int | None, typer.Option("--blank", help="Blank index (overrides the file).")]
Utts = Annotated[
    list[str] | None, typer.Option("--utt", help="Only this utterance id (repeatable).")
]
UttList = Annotated[
    str | None, typer.Option("--utt-list", help="File of utterance ids, one a line; '-' = stdin.")
]
Quiet = Annotated[bool, typer.Option("-q", "--quiet", help="Hide progress and info.")]


def _check_format(fmt: str | None, output: str | None) -> str:
    from .output import FORMATS, default_format

    fmt = fmt or default_format(output)
    if fmt not in FORMATS:
        raise fail(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise fail(f"--device {device!r} is not one of auto, cpu, cuda")
    if device == "auto":
        # No NVIDIA device node, no CUDA: skip importing torch (a second of start-up;
        # CPU scoring of raw dumps never needs it).
        if not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")):
            return "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        import torch

        if not torch.cuda.is_available():
            raise fail("--device cuda: no usable CUDA GPU here (torch.cuda.is_available() "
                       "is False); use --device cpu")
    return device


def _wanted(utts: list[str] | None, utt_list: str | None) -> list[str] | None:
    if not utts and not utt_list:
        return None
    wanted = list(utts or [])
    if utt_list:
        wanted += _read_utt_list(utt_list)
    return wanted


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


@contextlib.contextmanager
def _selection(inputs: list[Path], blank: int | None, utts: list[str] | None,
               utt_list: str | None, direct: bool = True, output: str | None = None):
    """Open every input and yield ``[(reader, selected ids)]``; close them all after.

    Each file is first opened in a child process (``reader.probe``: a file that
    crashes HDF5 itself is one line). An id asked for with --utt/--utt-list that
    no input holds is an error; so is an ``output`` that is a file an input's
    external links name.
    """
    from .output import check_writable
    from .reader import DumpReader, probe, show

    wanted = _wanted(utts, utt_list)
    readers = []
    try:
        for p in inputs:
            probe(p, blank)
            readers.append(DumpReader(p, blank=blank, direct=direct))
        check_writable(output, _inputs_of(inputs, utt_list) + _linked(readers))
        selected = []
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
    return Progress(
        "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
        TimeRemainingColumn(), console=_stderr(), transient=True, disable=disable,
    )


# --------------------------------------------------------------------------- score
@app.command()
@command
def score(
    inputs: Inputs,
    output: Output = None,
    fmt: Format = None,
    device: Device = "auto",
    blank: Blank = None,
    utt: Utts = None,
    utt_list: UttList = None,
    batch_mb: Annotated[int, typer.Option("--batch-mb", help="Memory budget of one padded "
                                          "batch, MiB.")] = 64,
    via_hdf5: Annotated[bool, typer.Option("--via-hdf5", "--no-mmap",
                                           help="Read all data through HDF5, even raw "
                                           "data rnntool could read straight from the "
                                           "file.")] = False,
    quiet: Quiet = False,
) -> None:
    """Per-utterance RNN-T losses of dumped logits.

    One row per utterance: utt_id, T, U, loss (-log P(y|x), nats), loss_per_frame,
    loss_per_token (loss / max(U, 1)); and stored_loss, loss_diff when the dump
    carries the trainer's own loss. A summary goes to stderr. Exit 1 if any loss
    cannot be true: NaN or inf, or below 0 by more than float rounding
    (8 float32 ulps per lattice arc, at least 1e-6 nats); those utterances are
    named on stderr, one line each, and their rows are still written as computed.
    """
    from .output import open_output, render
    from .reader import show
    from .score import SCORE_FIELDS, STORED_FIELDS, loss_problem, score_reader, summarize

    ins = _inputs_of(inputs, utt_list)
    fmt = _output_format(fmt, output, ins)
    dev = _resolve_device(device)
    rows = []
    with _selection(inputs, blank, utt, utt_list, direct=not via_hdf5,
                    output=output) as selected:
        total = sum(len(ids) for _, ids in selected)
        with _progress(quiet) as bar:
            task = bar.add_task("scoring", total=total)
            for reader, ids in selected:
                order = {u: i for i, u in enumerate(ids)}
                got = list(score_reader(reader, ids, device=dev, budget_bytes=batch_mb << 20,
                                        on_batch=lambda n: bar.advance(task, n)))
                got.sort(key=lambda r: order[r["utt_id"]])
                for r in got:
                    r["_file"] = reader.name
                rows += got
    fields = SCORE_FIELDS + (STORED_FIELDS if any("stored_loss" in r for r in rows) else [])
    with open_output(output, ins) as out:
        render(rows, fields, fmt, out, title="RNN-T loss per utterance")
    summary = summarize(rows)
    err = _stderr()
    problems = 0
    for r in rows:
        why = loss_problem(r["loss"], r["T"], r["U"], r["_float64"], r["_input_eps"])
        if why is not None:
            problems += 1
            err.print(f"rnntool: {r['_file']}: utterance {show(r['utt_id'])}: {why}", markup=False)
    if not quiet:
        err.print(f"{summary['count']} utterances, mean loss {summary['mean']:.4f}, "
                  f"total {summary['total']:.4f} nats ({summary['finite']} finite)", markup=False)
        if summary["worst"]:
            err.print("worst: " + ", ".join(f"{show(r['utt_id'])} {r['loss']:.3f}"
                                            for r in summary["worst"]), markup=False)
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- inspect
@app.command()
@command
def inspect(
    input: Annotated[Path, typer.Argument(help="An HDF5 dump.")],
    fmt: Annotated[str | None, typer.Option("--format", "-f", help="text|json.")] = None,
    blank: Blank = None,
) -> None:
    """What a dump holds, and every problem in it.

    Prints layout, blank, vocab, input kind, number of utterances, T/U/V ranges,
    dtypes and size. Every problem found goes to stderr, one line each naming
    the file and utterance, and makes the exit code 1: bad labels, lengths or
    shapes; NaN/+inf logits; a loss that is +inf or below 0 beyond rounding (as
    score says); and for input_kind=log_probs, rows that do not normalise:
    |logsumexp over V| above 4 * eps * max(1, ln V), eps that of the precision
    the values carry (float16 9.8e-4, bfloat16 7.8e-3, float32 1.2e-7, float64
    2.2e-16), 8 times what rounding can do.
    """
    import json

    import numpy as np

    from .dump import DumpError, log_prob_problem
    from .reader import DumpReader, probe, show
    from .score import loss_problem, score_reader

    fmt = fmt or "text"
    if fmt not in ("text", "json"):
        raise fail(f"--format {fmt!r} is not one of text, json")
    found: dict[str, list[str]] = {}  # utterance -> its problems, in file order
    probe(input, blank)
    with DumpReader(input, blank=blank) as r:
        infos = []
        for u in r.utt_ids:
            found[u] = []
            try:
                one = r.read(u)
                info, x = one.info, one.logits
                n_bad = int(np.count_nonzero(np.isnan(x) | np.isposinf(x)))
                if n_bad:
                    found[u].append(f"{r.name}: utterance {show(u)}: {n_bad} NaN or +inf logits")
                if r.input_kind == "log_probs":
                    why = log_prob_problem(x)
                    if why is not None:
                        found[u].append(f"{r.name}: utterance {show(u)}: {why}")
                infos.append(info)
            except DumpError as e:
                found[u].append(str(e))
        # Losses that cannot be true: +inf (no alignment possible) or negative (NaN
        # losses come from the NaN/+inf logits already reported).
        for row in score_reader(r, [i.utt_id for i in infos], device="cpu"):
            why = loss_problem(row["loss"], row["T"], row["U"], row["_float64"],
                               row["_input_eps"])
            if why is not None and not math.isnan(row["loss"]):
                found[row["utt_id"]].append(f"{r.name}: utterance {show(row['utt_id'])}: {why}")
        problems = [p for ps in found.values() for p in ps]

        def span(vals):
            return [min(vals), max(vals)] if vals else None

        facts = {
            "file": str(input),
            "layout": r.layout,
            "blank": r.blank,
            "vocab_size": r.vocab_size,
            "vocab": "yes" if r.vocab is not None else "no",
            "input_kind": r.input_kind,
            "utterances": len(r),
            "T": span([i.T for i in infos]),
            "U": span([i.U for i in infos]),
            "V": span([i.V for i in infos]),
            "dtypes": sorted({str(i.dtype) for i in infos}),
            "with_stored_loss": sum("loss" in i.attrs for i in infos),
            "with_grads": sum(i.has_grads for i in infos),
            "size_bytes": r.file_size(),
            "problems": len(problems),
        }
    if fmt == "json":
        print(json.dumps(facts, indent=1))
    else:
        for k, v in facts.items():
            if isinstance(v, list):
                v = "-".join(map(str, v)) if k in ("T", "U", "V") else ", ".join(v)
            if k == "size_bytes":
                k, v = "size", f"{v / 2**20:.2f} MiB ({v} bytes)"
            print(f"{k}\t{v}")
    for p in problems:
        print(f"rnntool: {p}", file=sys.stderr)
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- align / plot
def _utterances(selected, with_grads: bool = False):
    """Yield ``(reader, Utterance)`` one at a time, validated, in input order."""
    for reader, ids in selected:
        for u in ids:
            yield reader, reader.read(u, with_grads=with_grads)


def _tensors(utt, device: str):
    import torch

    dev = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(utt.logits)[None].to(dev)
    y = torch.from_numpy(utt.labels)[None].to(dev)
    return x, y, torch.tensor([utt.info.T]), torch.tensor([utt.info.U])


ALIGN_FIELDS = ["utt_id", "position", "token_id", "token", "frame", "expected_frame",
                "frame_posterior"]


@app.command("align")
@command
def align_cmd(
    inputs: Inputs,
    output: Output = None,
    fmt: Format = None,
    device: Device = "auto",
    blank: Blank = None,
    utt: Utts = None,
    utt_list: UttList = None,
    quiet: Quiet = False,
) -> None:
    """Where each token is emitted, on the best path and in expectation.

    One row per token: utt_id, position (0-based), token_id, token (from the
    dump's vocab), frame (Viterbi emission frame), expected_frame (posterior
    mean over all alignments), frame_posterior (probability of emitting the token
    at that frame). In table mode each utterance's best-path log-probability and
    full loss go to stderr. An utterance whose loss is not finite (NaN or +inf
    logits, or no possible alignment) gets no rows: one line on stderr names it,
    the others are still aligned, and the exit code is 1 (also for a loss below
    0 beyond rounding, whose rows are written). Posteriors are within [0, 1].
    """
    import numpy as np

    from .align import align
    from .output import open_output, render
    from .reader import show
    from .score import input_eps

    ins = _inputs_of(inputs, utt_list)
    fmt = _output_format(fmt, output, ins)
    dev = _resolve_device(device)
    rows, summary, problems = [], [], 0
    with _selection(inputs, blank, utt, utt_list, output=output) as selected:
        for reader, u in _utterances(selected):
            with _Utterance(reader.path, u.info.utt_id) as one:
                (al,) = align(*_tensors(u, dev), blank=reader.blank,
                              fused_log_softmax=reader.input_kind == "logits", backend=dev)
                usable = one.check(al.loss, al.T, al.U, u.logits.dtype == np.float64,
                                   input_eps(reader, u.logits.dtype))
            problems += one.problem is not None
            if not usable:
                continue
            summary.append((u.info.utt_id, al.best_log_prob, al.loss))
            for pos in range(al.U):
                tok = int(u.labels[pos])
                rows.append({
                    "utt_id": u.info.utt_id, "position": pos, "token_id": tok,
                    "token": reader.vocab[tok] if reader.vocab else "",
                    "frame": int(al.frames[pos]),
                    "expected_frame": float(al.expected_frames[pos]),
                    "frame_posterior": float(al.frame_posteriors[pos]),
                })
    with open_output(output, ins) as out:
        render(rows, ALIGN_FIELDS, fmt, out, title="Token emission frames")
    if fmt == "table" and not quiet:
        err = _stderr()
        for utt_id, best, loss in summary:
            err.print(f"{show(utt_id)}: best path log P = {best:.4f}, all paths log P = "
                      f"{-loss:.4f} (loss {loss:.4f}); best path holds "
                      f"{math.exp(best + loss):.1%} of the probability", markup=False)
    if problems:
        raise typer.Exit(1)


@app.command()
@command
def plot(
    inputs: Inputs,
    out_dir: Annotated[Path, typer.Option("--out-dir", "-d", help="Directory for the PNGs.")],
    device: Device = "auto",
    blank: Blank = None,
    utt: Utts = None,
    utt_list: UttList = None,
    quiet: Quiet = False,
) -> None:
    """Heatmaps of each utterance's T x (U+1) lattice, as OUT_DIR/<utt_id>.png.

    Two panels: log node occupancy with the Viterbi path over it, and the
    per-node gradient norm ||d loss / d logits[t, u, :]||. Long utterances are
    reduced by block maxima (the figure says so). An utterance whose loss is not
    finite gets no PNG: one line on stderr names it, the others are still drawn,
    and the exit code is 1 (also for a loss below 0 beyond rounding, drawn).
    """
    import numpy as np

    from .align import align
    from .loss import rnnt_loss
    from .output import atomic_file, confined_name
    from .plots import plot_utterance
    from .reader import show
    from .score import input_eps

    if (out_dir.exists() or out_dir.is_symlink()) and not out_dir.is_dir():
        raise fail(f"{show(out_dir)}: exists and is not a directory"
                   + (" (a symbolic link to nothing)" if not out_dir.exists() else ""))
    dev = _resolve_device(device)
    with _selection(inputs, blank, utt, utt_list) as selected:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise fail(f"{show(out_dir)}: cannot create the directory ({e.strerror})") from None
        # A PNG must never replace an input (a dump named like one, in the out dir).
        reads = _inputs_of(inputs, utt_list) + _linked(r for r, _ in selected)
        n = problems = 0
        for reader, u in _utterances(selected):
            with _Utterance(reader.path, u.info.utt_id) as one:
                x, y, T, U = _tensors(u, dev)
                fused = reader.input_kind == "logits"
                (al,) = align(x, y, T, U, blank=reader.blank, fused_log_softmax=fused,
                              backend=dev)
                if one.check(al.loss, al.T, al.U, u.logits.dtype == np.float64,
                             input_eps(reader, u.logits.dtype)):
                    xg = x.clone().requires_grad_(True)
                    rnnt_loss(xg, y, T, U, blank=reader.blank, reduction="sum",
                              fused_log_softmax=fused, backend=dev).backward()
                    gnorm = xg.grad[0].double().norm(dim=-1).cpu().numpy()
                    tokens = [reader.vocab[int(t)] for t in u.labels] if reader.vocab else None
                    # A file name from an untrusted id: confined to out_dir (percent-encoded).
                    dest = out_dir / confined_name(u.info.utt_id, ".png")
                    with atomic_file(dest, inputs=reads) as png:
                        plot_utterance(png, utt_id=u.info.utt_id, loss=al.loss,
                                       best_log_prob=al.best_log_prob, occupancy=al.occupancy,
                                       best_path=al.path, grad_norm=gnorm, tokens=tokens)
                    n += 1
            problems += one.problem is not None
    if not quiet:
        _stderr().print(f"wrote {n} PNGs to {out_dir}", markup=False)
    if problems:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- grad-check
GRADCHECK_FIELDS = ["utt_id", "check", "max_abs_err", "max_rel_err", "atol", "rtol", "result"]


@app.command("grad-check")
@command
def grad_check(
    inputs: Inputs,
    output: Output = None,
    fmt: Format = None,
    device: Device = "auto",
    blank: Blank = None,
    utt: Utts = None,
    utt_list: UttList = None,
    samples: Annotated[int, typer.Option("--samples", help="Finite-difference probes per "
                                         "utterance.")] = 20,
    rtol: Annotated[float, typer.Option("--rtol", help="Relative tolerance.")] = 1e-3,
    atol: Annotated[float, typer.Option("--atol", help="Absolute tolerance.")] = 1e-5,
    quiet: Quiet = False,
) -> None:
    """Check gradients w.r.t. the logits against a float64 reference.

    Per utterance: the engine against the float64 reference (every entry); the
    reference against central finite differences (--samples entries); the dump's
    stored `grads` (a trainer's gradient of that utterance's loss) against the
    reference; and CPU against CUDA when both run here. A check passes when
    |a - b| <= atol + rtol * |b| everywhere. Exit 1 if any fails. An utterance
    whose loss is not finite is not checked (no rows): one line on stderr names
    it, the others are still checked, and the exit code is 1 (also for a loss
    below 0 beyond rounding, whose checks are written).
    """
    from .gradcheck import cuda_usable, grad_check_utterance
    from .output import open_output, render
    from .reader import show
    from .score import input_eps

    ins = _inputs_of(inputs, utt_list)
    fmt = _output_format(fmt, output, ins)
    if samples < 0 or not (math.isfinite(rtol) and rtol >= 0) or not (
            math.isfinite(atol) and atol >= 0):
        raise fail("--samples, --rtol and --atol must be finite and not negative")
    dev = _resolve_device(device)
    rows, problems = [], 0
    with _selection(inputs, blank, utt, utt_list, output=output) as selected:
        both = dev == "cpu" and cuda_usable()
        for reader, u in _utterances(selected, with_grads=True):
            with _Utterance(reader.path, u.info.utt_id) as one:
                checks = grad_check_utterance(
                    u.logits, u.labels, blank=reader.blank,
                    fused=reader.input_kind == "logits", backend=dev, samples=samples,
                    rtol=rtol, atol=atol, stored=u.grads, compare_cuda=both,
                )
                one.check(checks.loss, u.info.T, u.info.U, True, input_eps(reader, u.logits.dtype))
            problems += one.problem is not None
            for c in checks:
                rows.append({"utt_id": u.info.utt_id, "_file": reader.name, "check": c.check,
                             "max_abs_err": c.max_abs_err, "max_rel_err": c.max_rel_err,
                             "atol": atol, "rtol": rtol, "result": "PASS" if c.passed else "FAIL"})
    with open_output(output, ins) as out:
        render(rows, GRADCHECK_FIELDS, fmt, out,
               title=f"Gradient checks (atol {atol:g}, rtol {rtol:g})",
               specs=dict.fromkeys(("max_abs_err", "max_rel_err", "atol", "rtol"), ".3e"))
    failed = [r for r in rows if r["result"] == "FAIL"]
    if not quiet:
        utts = len({r["utt_id"] for r in rows})
        _stderr().print(f"{len(rows) - len(failed)}/{len(rows)} checks passed on {utts} "
                        f"utterances (atol {atol:g}, rtol {rtol:g})", markup=False)
    for r in failed:
        print(f"rnntool: {r['_file']}: utterance {show(r['utt_id'])}: FAIL {r['check']}: max abs "
              f"err {r['max_abs_err']:.3g}, max rel err {r['max_rel_err']:.3g}", file=sys.stderr)
    if failed or problems:
        raise typer.Exit(1)


def main() -> None:
    # Default SIGPIPE handling would kill us mid-write with no cleanup; Python's
    # BrokenPipeError is caught per command instead. SIGINT, SIGTERM and SIGHUP
    # remove every temporary file and exit 130/143/129 with one line (cleanup.py).
    from . import cleanup

    cleanup.install_cli_handlers()
    app()
