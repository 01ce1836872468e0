"""Scoring past one process: shares of the utterances, part files, their merge, torchrun.

A run over many dumps is split into N *shares* of its utterances. Share K of N
is what ``--shard K/N`` runs in a plain process (a scheduler's array job), and
what rank K of a ``torchrun`` job of world size N runs; each writes a *part
file* beside the output, and the parts are merged into exactly the rows a
single process writes, in the same order (``merge_parts``; ``rnntool merge``,
or rank 0 after a barrier under torchrun).

**Assignment** (``share_of``): an utterance belongs to share
``blake2b(path + NUL + utt_id) mod N``, the path as given on the command line.
A stable hash, not a size-balanced plan: every process decides alone, from the
ids it reads anyway, without reading every utterance's shape first (N
processes each reading the metadata of every utterance of every shard is the
load a cluster file system likes least); it does not depend on how many
processes start or in what order, and with many utterances per share the
shares' sizes differ by a few percent (a size-balanced plan would only win on
a handful of huge utterances). Each process still opens every input, but reads
only its share's utterances.

**Order key**: ``(input index, utterance index)`` in the single-process
order (inputs as given, each file's ids in the order selected); stored in the
part with each utterance's rows, never in the merged output.

**Part files** (``PartWriter``), ``OUTPUT.part-K-of-N``, JSON lines:

- line 1, the header: ``{"rnntool_part": 1, "share": [K, N], "share_utterances":
  n, "fields": [...], "fingerprint": {...}}``; ``fields``: the columns this
  share's utterances call for (``merged_fields``: no process looks at another
  share's utterances); the fingerprint records rnntool's version, the command,
  each input's path as given, size and modification time, a SHA-256 of the
  selected utterance ids, the options that change rows (``--blank``,
  ``--device``'s backend, ``--skip-bad``; ``timestamps``' frame shift, unit,
  word separator, window, aggregate, channel and ``--ref`` by name and SHA-256),
  the format, and the counts. The
  header is written whole (temporary file, fsync, rename), so a part either
  does not exist or has one.
- then one line per utterance: ``{"k": [i, j], "rows": [...], "info": {...}}``,
  the rows as the command writes them (floats in full precision: JSON keeps
  every bit; for ``timestamps --format ctm`` each line with its start, which the
  merge sorts by, and for ``lhotse`` the JSON lines themselves) and what the
  summary and exit code need (``info``: ``timestamps --ref``'s offsets); each line is
  flushed to the operating system when written, fsynced every
  ``FSYNC_EVERY`` lines, so a kill at any moment leaves complete lines and at
  most one partial last line, which ``--resume`` cuts off.
- last, ``{"end": n}`` when the share is complete.

**Resume**: a part whose fingerprint differs from the run's is refused (one
line naming the first difference, exit 2); otherwise the utterances in it are
skipped and the rest appended.

**torchrun** (``Torchrun``): detected by ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in the environment. Each rank runs on ``cuda:LOCAL_RANK`` (modulo
the GPUs it sees) when the backend is CUDA, else on the CPU with
``cores // LOCAL_WORLD_SIZE`` Numba threads (at least 1). torch.distributed
carries only a status word per rank (``all_reduce`` of a small CPU tensor over
gloo; the group is created with ``cuda:nccl`` beside it on GPUs): the rows
travel through the part files, so ``-o`` must be on a file system every rank
sees. A rank that hits bad input stops scoring and says so through the
rendezvous store (``tell_stop``); the others stop at their next utterance
(``should_stop``, asked once a second), and every rank exits 2 after the
barrier, without a merged output; a rank that dies (a crash, SIGKILL) is
torchrun's to notice, which then stops the others.

Test hook: ``RNNTOOL_TEST_KILL_AFTER=n`` makes a ``PartWriter`` SIGKILL its own
process right after its n-th line (the tests' deterministic "kill mid-way"), and
``RNNTOOL_TEST_RECORD_DELAY=s`` sleeps s seconds after each line (a slow rank); with
``RNNTOOL_TEST_KILL_RANK=r`` both apply only in the process whose ``RANK`` is r.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .files import OutputError, cannot_write, replacing

PART_VERSION = 1
FSYNC_EVERY = 256  # lines between fsyncs of a part (each line is flushed when written)
DEFAULT_TIMEOUT_S = 24 * 3600  # how long a rank waits for the slowest one at the barrier
STOP_POLL_S = 1.0  # how often a rank asks whether another one has failed
STOPPED = 3  # a rank's status at the barrier when it stopped because another failed


class ShareError(Exception):
    """A part file, a share or a distributed run cannot be used (one line, exit 2)."""


# --------------------------------------------------------------------------- shares
@dataclass(frozen=True)
class Share:
    """Share ``index`` (K, 0-based) of ``count`` (N)."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_share(text: str) -> Share:
    """``"K/N"`` (0 <= K < N) as a ``Share``; ValueError (one line) otherwise."""
    k, sep, n = text.partition("/")
    try:
        share = Share(int(k), int(n))
    except ValueError:
        share = None
    if not sep or share is None or share.count < 1 or not 0 <= share.index < share.count:
        raise ValueError(f"--shard {text!r} is not K/N with 0 <= K < N (e.g. 0/4)")
    return share


def share_of(path: str, utt_id: str, count: int) -> int:
    """The share (0 .. count-1) utterance ``utt_id`` of the input named ``path`` (as
    given) belongs to: ``blake2b(path NUL utt_id)``, 8 bytes little-endian, mod
    ``count``. The same on every machine and Python (no ``hash()`` salt)."""
    raw = os.fsencode(path) + b"\0" + utt_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") % count


@dataclass
class Work:
    """What one process does: ``[(input index, reader, ids, utterance indices)]`` in
    single-process order, the utterances already done (``--resume``) left out."""

    items: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return sum(len(ids) for _, _, ids, _ in self.items)

    def pairs(self) -> list:
        """``[(reader, ids)]``, the shape a command's selection has."""
        return [(r, ids) for _, r, ids, _ in self.items]

    def without(self, done: frozenset | set) -> Work:
        """This work less the ``(i, j)`` keys in ``done`` (what ``--resume`` skips)."""
        if not done:
            return self
        out = Work()
        for i, reader, ids, js in self.items:
            keep = [(j, u) for j, u in zip(js, ids, strict=True) if (i, j) not in done]
            out.items.append((i, reader, [u for _, u in keep], [j for j, _ in keep]))
        return out


def plan_work(selected: Sequence, share: Share | None = None,
              done: frozenset | set = frozenset()) -> Work:
    """The ``Work`` of ``share`` (everything for None) of ``selected`` (``[(reader,
    ids)]``, a ``cli.Selection``), without the ``(i, j)`` keys in ``done``."""
    work = Work()
    for i, (reader, ids) in enumerate(selected):
        keep = [(j, u) for j, u in enumerate(ids)
                if (share is None or share_of(reader.path, u, share.count) == share.index)
                and (i, j) not in done]
        work.items.append((i, reader, [u for _, u in keep], [j for j, _ in keep]))
    return work


def part_path(output: str, share: Share) -> str:
    """The part file of ``share`` for ``-o output``: ``output.part-K-of-N``."""
    return f"{output}.part-{share.index}-of-{share.count}"


# --------------------------------------------------------------------------- fingerprint
def fingerprint(command: str, selected: Sequence, *, options: dict, fmt: str,
                several: bool, empty: Sequence[str]) -> dict:
    """What must be the same for two parts to belong to one run (JSON-able).

    Inputs by path as given, size and modification time (nanoseconds); the
    selected ids by SHA-256 (ids and file boundaries); ``options``: those that
    change rows, by their option names."""
    from . import __version__

    inputs = []
    ids = hashlib.sha256()
    for reader, utt_ids in selected:
        try:
            st = os.stat(reader.path)
        except OSError as e:
            raise ShareError(f"{reader.name}: cannot stat ({e.strerror})") from None
        inputs.append({"path": reader.path, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        ids.update(json.dumps(list(utt_ids)).encode("utf-8", "surrogatepass") + b"\n")
    return {
        "rnntool": __version__, "command": command, "inputs": inputs,
        "utterance_ids_sha256": ids.hexdigest(),
        "utterances": sum(len(u) for _, u in selected),
        "options": dict(options), "format": fmt, "several": several, "empty": list(empty),
    }


def difference(old: dict, new: dict) -> str | None:
    """The first way fingerprint ``old`` (a part's) differs from ``new`` (this run's), in
    words; None when they are the same."""
    if old == new:
        return None
    if old.get("command") != new.get("command"):
        return f"by 'rnntool {old.get('command')}', not '{new.get('command')}'"
    a, b = old.get("inputs") or [], new.get("inputs") or []
    if [x.get("path") for x in a] != [x.get("path") for x in b]:
        return (f"from the inputs {' '.join(str(x.get('path')) for x in a)}, not "
                f"{' '.join(str(x.get('path')) for x in b)}")
    for x, y in zip(a, b, strict=True):
        if x != y:
            what = "size" if x.get("size") != y.get("size") else "modification time"
            return f"from another version of {x.get('path')} (its {what} has changed since)"
    for key, value in (old.get("options") or {}).items():
        if (new.get("options") or {}).get(key) != value:
            return f"with {key} {_opt(value)}, not {_opt((new.get('options') or {}).get(key))}"
    for key in ("utterance_ids_sha256", "format", "rnntool"):
        if old.get(key) != new.get(key):
            return {"utterance_ids_sha256": "from another selection of utterances (--utt, "
                                            "--utt-list)",
                    "format": f"with --format {old.get(key)}, not {new.get(key)}",
                    "rnntool": f"by rnntool {old.get(key)}, not {new.get(key)}"}[key]
    return "with other inputs or options"


def _opt(value) -> str:
    return "(not given)" if value is None else str(value).lower() if isinstance(
        value, bool) else str(value)


# --------------------------------------------------------------------------- records
@dataclass
class Record:
    """One utterance's result: ``key`` ``(i, j)``, its ``rows`` (dicts as the command
    writes them) and ``info`` (what the summary and the exit code need; JSON-able)."""

    key: tuple
    rows: list
    info: dict


def _json_default(v):
    item = getattr(v, "item", None)  # a numpy scalar
    if item is not None:
        return item()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _dumps(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), default=_json_default)


def _strict_loads(text: str, where: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise ShareError(f"{where}: is not an rnntool part file (a line is not JSON)") from None


# --------------------------------------------------------------------------- writing a part
class PartWriter:
    """Appends an utterance's ``Record`` as one line of the part file ``path``.

    ``PartWriter(path, fingerprint, share, share_utterances, fields, resume=False)``
    (``fields``: the columns this share's utterances call for): a new
    part (its header written whole first; an existing part is replaced) or, with
    ``resume``, the existing one continued: ``done`` then holds the keys already in
    it, a partial last line is cut off, and a fingerprint that differs from this
    run's raises ShareError naming the difference. ``complete``: the part already
    ended (nothing to do). ``write(record)``; ``finish()`` writes the end line and
    fsyncs. OSErrors become ``OutputError("PATH: cannot write (...)")``.
    """

    def __init__(self, path: str, fingerprint: dict, share: Share, share_utterances: int,
                 fields: Sequence[str], *, resume: bool = False) -> None:
        self.path = path
        self.done: set = set()
        self.flagged = 0  # records already in the part that name a problem
        self.complete = False
        self.written = 0
        self._f = None
        header = {"rnntool_part": PART_VERSION, "share": [share.index, share.count],
                  "share_utterances": share_utterances, "fields": list(fields),
                  "fingerprint": fingerprint}
        if resume and os.path.lexists(path):
            old = read_part(path)
            why = difference(old.header.get("fingerprint") or {}, fingerprint)
            if why is None and old.header.get("share") != header["share"]:
                why = f"for share {old.share}, not {share}"
            if why is not None:
                raise ShareError(f"{path}: was made {why}; run without --resume to start "
                                 "over")
            old.cut()
            for rec in old.records():
                self.done.add(rec.key)
                self.flagged += bool(rec.info.get("problem") or rec.info.get("bad"))
            self.complete = old.complete
        else:
            try:
                with replacing(path, None, name=path) as f:
                    f.write(_dumps(header) + "\n")
            except OSError as e:
                raise cannot_write(path, e) from None
        self._kill_after = int(os.environ.get("RNNTOOL_TEST_KILL_AFTER") or 0)
        self._delay = float(os.environ.get("RNNTOOL_TEST_RECORD_DELAY") or 0)
        if os.environ.get("RNNTOOL_TEST_KILL_RANK", os.environ.get("RANK")) != os.environ.get(
                "RANK"):
            self._kill_after = self._delay = 0
        if not self.complete:
            try:
                self._f = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115
            except OSError as e:
                raise cannot_write(path, e) from None

    def write(self, record: Record) -> None:
        line = _dumps({"k": list(record.key), "rows": record.rows, "info": record.info})
        try:
            self._f.write(line + "\n")
            self._f.flush()
            self.written += 1
            if self.written % FSYNC_EVERY == 0:
                os.fsync(self._f.fileno())
        except OSError as e:
            raise cannot_write(self.path, e) from None
        if self._kill_after and self.written >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if self._delay:
            time.sleep(self._delay)

    def finish(self) -> None:
        """The end line, flushed and fsynced; the file closed."""
        if self._f is None:
            return
        try:
            self._f.write(_dumps({"end": len(self.done) + self.written}) + "\n")
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            raise cannot_write(self.path, e) from None
        finally:
            self._f = None

    def close(self) -> None:
        """Close without the end line (a stopped run: the part stays for --resume)."""
        if self._f is not None:
            with contextlib.suppress(OSError):
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
            self._f = None


# --------------------------------------------------------------------------- checking records
# A part is untrusted input: every record is checked against what its command writes
# before a tally sees it, so a damaged or edited part is one line (exit 2), never a
# traceback or a wrong cell. Row dicts (tsv, csv, jsonl, json, table): keys among the
# header's fields and "file"; "utt_id" and "file" (and score's columns, which its summary
# adds up) present; string columns strings, every other column a number; null allowed
# where a row may leave a cell empty. ``timestamps`` CTM parts hold [start, line] items,
# lhotse parts JSON lines (strings).
STRING_COLUMNS = frozenset({"utt_id", "file", "token", "word", "tokens", "ref_word", "kind"})
REQUIRED_COLUMNS = {
    "score": ("utt_id", "T", "U", "loss", "loss_per_frame", "loss_per_token", "file"),
}
_ANY_REQUIRED = ("utt_id", "file")
_LINE_FORMATS = ("ctm", "lhotse")


def _is_number(v) -> bool:
    return type(v) in (int, float)


def _cell_problem(name: str, v) -> str | None:
    if name in STRING_COLUMNS:
        ok = isinstance(v, str) or (v is None and name not in _ANY_REQUIRED)
    else:
        ok = v is None or _is_number(v)
    return None if ok else f"a row's {name} is {type(v).__name__} {_short(v)}"


def _short(v) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _record_problem(rows: list, info: dict, header: dict) -> str | None:
    """Why the record ``rows``/``info`` is not one its part's command writes, or None."""
    fp = header.get("fingerprint") or {}
    command, fmt = fp.get("command"), fp.get("format")
    for key in ("problem", "bad", "where", "utt_id"):
        if info.get(key) is not None and not isinstance(info[key], str):
            return f"its {key} is not a string"
    if info.get("problem") and not (rows if command == "score" else info.get("where")):
        return "a record names a problem but not where"
    summary = info.get("summary")
    if summary is not None and not (
            isinstance(summary, list) and len(summary) == 4 and isinstance(summary[0], str)
            and all(_is_number(x) for x in summary[1:])):
        return "a record's summary is not [utt_id, best, loss, share]"
    delays = info.get("delays")
    if delays is not None:
        from .timestamps import SUMMARY_KEYS

        if not (isinstance(delays, list) and all(
                isinstance(d, dict) and all(_is_number(d.get(k)) for k in SUMMARY_KEYS)
                for d in delays)):
            return "a record's delays are not offsets"
    if command == "timestamps" and fmt in _LINE_FORMATS:
        if fmt == "lhotse":
            return None if all(isinstance(r, str) for r in rows) else \
                "a lhotse line is not a string"
        if rows and not isinstance(info.get("utt_id"), str):
            return "CTM lines without their utterance id"
        ok = all(isinstance(r, list) and len(r) == 2 and _is_number(r[0])
                 and isinstance(r[1], str) for r in rows)
        return None if ok else "a CTM item is not [start, line]"
    fields = set(header.get("fields") or ()) | {"file"}
    required = REQUIRED_COLUMNS.get(command, _ANY_REQUIRED)
    for r in rows:
        if not isinstance(r, dict):
            return f"a row is {type(r).__name__}, not an object"
        extra = [k for k in r if k not in fields]
        if extra:
            return f"a row has a column {_short(extra[0])} not in its header"
        missing = [k for k in required if k not in r]
        if missing:
            return f"a row has no {missing[0]}"
        for name, v in r.items():
            why = _cell_problem(name, v)
            if why is not None:
                return why
    return None


# --------------------------------------------------------------------------- reading parts
@dataclass
class Part:
    """A part file read: ``header``, ``share``, whether it ``complete``\\ d, and its
    lines' byte range (records are parsed lazily by ``records``)."""

    path: str
    header: dict
    share: Share
    complete: bool
    count: int  # the end line's count (complete parts)
    _start: int = 0
    _stop: int = 0
    _end: int = 0  # the end of the last complete line
    _size: int = 0

    def cut(self) -> None:
        """Cut a partial last line off the file (before appending to it)."""
        if self._end < self._size:
            try:
                with open(self.path, "rb+") as f:
                    f.truncate(self._end)
                    os.fsync(f.fileno())
            except OSError as e:
                raise cannot_write(self.path, e) from None
            self._size = self._end

    def records(self) -> Iterator[Record]:
        """The part's records in file order, checked: keys strictly increasing."""
        where = self.path
        last = None
        with open(self.path, "rb") as f:
            f.seek(self._start)
            left = self._stop - self._start
            for raw in f:
                if left <= 0:
                    break
                left -= len(raw)
                obj = _strict_loads(raw.decode("utf-8", "surrogateescape"), where)
                try:
                    key, rows, info = tuple(obj["k"]), obj["rows"], obj["info"]
                    ok = (len(key) == 2 and all(type(x) is int for x in key)
                          and isinstance(rows, list) and isinstance(info, dict))
                except (KeyError, TypeError):
                    ok = False
                if ok:
                    why = _record_problem(rows, info, self.header)
                else:
                    why = "a line is not an utterance's record"
                if why is not None:
                    raise ShareError(f"{where}: is not an rnntool part file ({why})")
                if last is not None and key <= last:
                    raise ShareError(f"{where}: utterance records are out of order or "
                                     "repeated; the file was edited")
                last = key
                yield Record(key, rows, info)

    def keys(self) -> list:
        return [r.key for r in self.records()]


def read_part(path: str) -> Part:
    """Read a part file's header and find its end; ShareError (one line) when it is not
    one. A partial last line (a run killed mid-write) is ignored (``Part.cut`` removes
    it), and the part is then incomplete."""
    try:
        f = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise ShareError(f"{path}: no such part file") from None
    except OSError as e:
        raise ShareError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        first = f.readline(1 << 20)
        if not first.endswith(b"\n"):
            raise ShareError(f"{path}: is not an rnntool part file")
        header = _strict_loads(first.decode("utf-8", "surrogateescape"), path)
        if not isinstance(header, dict) or "rnntool_part" not in header:
            raise ShareError(f"{path}: is not an rnntool part file")
        if header["rnntool_part"] != PART_VERSION:
            raise ShareError(f"{path}: part format {header['rnntool_part']!r} is not this "
                             f"rnntool's ({PART_VERSION})")
        k_n = header.get("share")
        fields = header.get("fields")
        if not (isinstance(k_n, list) and len(k_n) == 2 and all(type(x) is int for x in k_n)
                and 0 <= k_n[0] < k_n[1] and isinstance(header.get("fingerprint"), dict)
                and isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
            raise ShareError(f"{path}: is not an rnntool part file (bad header)")
        share = Share(*k_n)
        start = f.tell()
        size = f.seek(0, os.SEEK_END)
        # The last complete line: look back from the end for the last newline.
        end = size
        while end > start:
            step = min(1 << 16, end - start)
            f.seek(end - step)
            chunk = f.read(step)
            nl = chunk.rfind(b"\n")
            if nl != -1:
                end = end - step + nl + 1
                break
            end -= step
        # Is the last complete line the end line?
        complete, count, stop = False, 0, end
        if end > start:
            f.seek(max(start, end - 4096))
            last = f.read(end - max(start, end - 4096)).rsplit(b"\n", 2)[-2]
            if last.startswith(b'{"end":'):
                obj = _strict_loads(last.decode("utf-8", "surrogateescape"), path)
                if not (isinstance(obj, dict) and type(obj.get("end")) is int):
                    raise ShareError(f"{path}: is not an rnntool part file (bad end line)")
                complete, count, stop = True, obj["end"], end - len(last) - 1
    return Part(path, header, share, complete, count, start, stop, end, size)


def check_parts(paths: Sequence[str]) -> list[Part]:
    """The parts of one run, complete, one per share, in share order; else ShareError
    naming the missing, repeated, mismatched or incomplete part."""
    if not paths:
        raise ShareError("no part files given")
    parts = [read_part(p) for p in paths]
    first = parts[0]
    n = first.share.count
    by_share: dict[int, Part] = {}
    for p in parts:
        why = difference(p.header["fingerprint"], first.header["fingerprint"])
        if why is None and p.share.count != n:
            why = f"for {p.share.count} shares, not {n}"
        if why is not None:
            raise ShareError(f"{p.path}: is not a part of the same run as {first.path} "
                             f"(it was made {why})")
        if p.share.index in by_share:
            raise ShareError(f"{by_share[p.share.index].path} and {p.path} are both share "
                             f"{p.share}")
        by_share[p.share.index] = p
    missing = [k for k in range(n) if k not in by_share]
    if missing:
        raise ShareError(f"share {missing[0]}/{n} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + f": give all {n} parts (the part of share K is "
                         f"OUTPUT.part-K-of-{n})")
    for p in parts:
        if not p.complete:
            raise ShareError(f"{p.path}: share {p.share} is incomplete (its run stopped); "
                             "rerun that share with --resume")
        if p.count != p.header.get("share_utterances"):
            raise ShareError(f"{p.path}: holds {p.count} utterances, its share has "
                             f"{p.header.get('share_utterances')}")
    total = sum(p.count for p in parts)
    if total != first.header["fingerprint"].get("utterances"):
        raise ShareError(f"the parts hold {total} utterances, the run selected "
                         f"{first.header['fingerprint'].get('utterances')}")
    return [by_share[k] for k in range(n)]


def merged_fields(parts: Sequence[Part]) -> list[str]:
    """The columns of the merged output: each part records those its own utterances
    call for (``score``'s ``stored_loss`` when one of them carries the trainer's
    loss); the merge takes the longest, of which every other is a part (ShareError
    otherwise), which is what one process deciding over every utterance writes."""
    lists = [p.header["fields"] for p in parts]
    fields = max(lists, key=len)
    for p, f in zip(parts, lists, strict=True):
        if not set(f) <= set(fields):
            raise ShareError(f"{p.path}: its columns {' '.join(f)} do not fit the others' "
                             f"({' '.join(fields)})")
    return list(fields)


def merged_records(parts: Sequence[Part]) -> Iterator[Record]:
    """The records of ``parts`` (``check_parts``) in single-process order: a streamed
    k-way merge by key (each part is in order), so memory does not grow with the run.
    ShareError for a key in two parts."""
    last = None
    for rec in heapq.merge(*(p.records() for p in parts), key=lambda r: r.key):
        if rec.key == last:
            raise ShareError(f"utterance {rec.key} is in two parts")
        last = rec.key
        yield rec


# --------------------------------------------------------------------------- torchrun
@dataclass
class Torchrun:
    """This process's place in a torchrun job (``torchrun_env``)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    _group: bool = False
    _store: object = None  # a client of the job's TCPStore, for the early stop
    _checked: float = 0.0

    @property
    def share(self) -> Share:
        return Share(self.rank, self.world_size)

    def use_device(self, backend: str) -> str:
        """Put this rank on its device: for ``"cuda"`` on a real GPU the
        ``LOCAL_RANK``-th one (modulo the GPUs visible) for torch and Numba alike,
        else the CPU with ``cores // LOCAL_WORLD_SIZE`` Numba (and torch) threads, at
        least 1. Returns the device, in words."""
        if backend == "cuda":
            from .devices import tensor_device

            if tensor_device("cuda") == "cuda":
                import torch
                from numba import cuda

                n = self.local_rank % torch.cuda.device_count()
                torch.cuda.set_device(n)
                cuda.select_device(n)
                return f"cuda:{n}"
            return "cuda (simulator)"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
        threads = max(1, cores // max(1, self.local_world_size))
        import numba

        from .threads import current_layer

        current_layer()  # rnntool's threading layer first, then the count
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        import sys

        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        return f"cpu ({threads} thread{'s' if threads > 1 else ''})"

    def init(self, cuda: bool) -> None:
        """Join the process group (gloo; ``cpu:gloo,cuda:nccl`` when on GPUs)."""
        import datetime

        import torch.distributed as dist

        timeout = float(os.environ.get("RNNTOOL_DIST_TIMEOUT") or DEFAULT_TIMEOUT_S)
        try:
            backend = "cpu:gloo,cuda:nccl" if cuda and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend,
                                    rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError, OSError) as e:
            text = str(e).strip().splitlines()
            raise ShareError("torch.distributed: cannot join the process group ("
                             + (text[0] if text else type(e).__name__) + ")") from None
        self._group = True
        # The rendezvous store (torchrun's agent, or rank 0's) carries one key: "a rank
        # failed". Without it the other ranks finish their shares before the barrier.
        with contextlib.suppress(KeyError, ValueError, RuntimeError, OSError):
            self._store = dist.TCPStore(os.environ["MASTER_ADDR"],
                                        int(os.environ["MASTER_PORT"]), is_master=False,
                                        timeout=datetime.timedelta(seconds=60))

    def _stop_key(self) -> str:
        return (f"rnntool/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
                f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/stop")

    def tell_stop(self) -> None:
        """Tell the other ranks that this one failed: they stop at their next record
        (``should_stop``) instead of finishing their shares."""
        if self._store is not None:
            with contextlib.suppress(Exception):
                self._store.set(self._stop_key(), str(self.rank))

    def should_stop(self) -> bool:
        """Whether another rank has failed (asked of the store at most once a second)."""
        now = time.monotonic()
        if self._store is None or now - self._checked < STOP_POLL_S:
            return False
        self._checked = now
        try:
            return bool(self._store.check([self._stop_key()]))
        except Exception:  # noqa: BLE001 - no answer: carry on, the barrier still decides
            return False

    def gather_status(self, code: int) -> list[int]:
        """Every rank's ``code`` (a barrier: returns when all ranks have called it).
        Waits in short sleeps, so SIGINT/SIGTERM still stop this process."""
        import torch
        import torch.distributed as dist

        codes = torch.zeros(self.world_size, dtype=torch.int64)
        codes[self.rank] = code
        work = dist.all_reduce(codes, async_op=True)
        while not work.is_completed():
            time.sleep(0.02)
        work.wait()
        return [int(c) for c in codes]

    def close(self) -> None:
        if self._group:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()
            self._group = False


def torchrun_env(environ=None) -> Torchrun | None:
    """The ``Torchrun`` this process is part of, from ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK`` (and ``LOCAL_WORLD_SIZE``, default 1) as torchrun sets them; None
    when they are not all set. ShareError for values that are not sane integers."""
    env = os.environ if environ is None else environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")):
        return None
    try:
        tr = Torchrun(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]),
                      int(env.get("LOCAL_WORLD_SIZE") or 1))
    except ValueError:
        raise ShareError("RANK, WORLD_SIZE, LOCAL_RANK: not integers (is this torchrun?)"
                         ) from None
    if not (0 <= tr.rank < tr.world_size and tr.local_rank >= 0):
        raise ShareError(f"RANK {tr.rank} is not within WORLD_SIZE {tr.world_size}")
    return tr


def remove_parts(paths: Sequence[str]) -> None:
    """Remove merged parts (errors ignored)."""
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)


def checked_output(output: str | None, what: str) -> str:
    """``-o`` as a part's base name: a regular file name is required (parts go beside
    it); ShareError otherwise."""
    from .files import resolve_target

    if output in (None, "-"):
        raise ShareError(f"{what} needs -o FILE: each share writes FILE.part-K-of-N beside "
                         "it")
    try:
        target = resolve_target(output)
    except OutputError as e:
        raise ShareError(str(e)) from None
    if target.stream:
        raise ShareError(f"{what} needs -o FILE to be a regular file name (the parts go "
                         f"beside it), not {output}")
    return output


__all__ = ["FSYNC_EVERY", "PART_VERSION", "Part", "PartWriter", "Record", "Share",
           "ShareError", "Torchrun", "Work", "check_parts", "checked_output", "difference",
           "fingerprint", "merged_fields", "merged_records", "parse_share", "part_path",
           "plan_work", "read_part", "remove_parts", "share_of", "torchrun_env"]
