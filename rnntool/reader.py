"""Reading dumps (keyed or padded layout; full or lattice kind) one utterance at a time,
as untrusted input.

A dump comes from someone else's run, a shared file system, a half-finished
copy: every size, link, attribute and id in it is checked before it is used,
and anything that cannot be proven right is a ``DumpError`` (one line naming
the file and the utterance, values shown as they are in the file), never a
wrong number, a hang or a crash:

- only a regular file is opened (a FIFO or a device would block or stream);
- every dataset's storage is checked against the file: raw data lies inside
  it, every chunk is written (HDF5 silently reads unwritten or missing data
  as zeros), nothing is stored in other files (external storage, virtual
  datasets); external links are followed only to regular files;
- logits stored raw (unfiltered, little-endian, contiguous or chunked along T
  in order, in the file that was opened) are read with ``pread`` straight into
  the engine's buffer, the rest through HDF5; the file's size and identity are
  checked after every read, so a file truncated or rewritten while it is read
  is an error, not zeros;
- sizes are checked against the memory available before anything is allocated.

``DumpReader`` does what every layout shares (opening, root attributes, links,
the file-identity checks, label and blank rules, direct reads); what a layout
stores where is one small class: ``_KeyedLayout`` (``/utts/<id>/...``),
``_PaddedLayout`` (root datasets of a padded batch) and ``_LatticeLayout``
(``/utts/<id>/...`` of a lattice dump), with the same methods.
The storage checks are ``rnntool.storage``'s; the label, blank and length rules
``rnntool.checks``'.

A dump's kind (root attribute ``dump_kind``, format version 2; absent: "full")
says what an utterance holds: "full", its ``(T, U+1, V)`` logits (``read``);
"lattice", only the three log-probs per lattice node the RNN-T loss needs
(``read_lattice``), computed with the file's blank, which cannot be
overridden. A lattice dump is keyed and records the V of its logits.

The model (root attribute ``model_kind``; absent: "rnnt") says what the logits
are: "tdt" logits are ``(T, U+1, V + D)``, V token logits then one per entry of
the root attribute ``durations`` (``DumpReader.durations``, checked as
``tdt_loss`` checks it); ``UttInfo.V`` counts tokens, ``UttInfo.D`` the duration
logits, ``UttInfo.width`` is what a node stores. A TDT lattice dump holds
``blank_lp``, ``emit_lp`` and ``dur_lp (T, U+1, D)`` (``dump.TDT_LATTICE_DATASETS``);
each ``dur_lp`` row must normalise (``read_lattice``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from .checks import bad_label, length_faults, normalise_blank, show
from .dump import (
    _FLOAT_DTYPES,
    DUMP_KINDS,
    FORMAT,
    FORMAT_VERSION,
    INPUT_KINDS,
    LATTICE_DATASETS,
    LATTICE_DTYPES,
    MODEL_KINDS,
    TDT_LATTICE_DATASETS,
    DumpError,
    check_dump_durations,
    lattice_shapes,
    log_prob_tolerance,
)
from .storage import RawRegion, StorageChecks, native, preadv_all


# --------------------------------------------------------------------------- infos
@dataclass
class UttInfo:
    """What is known of an utterance without reading its logits.

    ``region`` is the ``RawRegion`` ``(byte offset, (T', U'+1, V))`` of its logits
    stored raw in the file (for the padded layout the utterance's whole padded
    slab), or None when they must be read through HDF5. ``kind`` is the dump's:
    "full" (logits) or "lattice" (``V`` is then the dump's vocabulary size, the V
    of the logits the lattice was computed from, and ``dtype`` the lattice's).
    """

    utt_id: str
    T: int
    U: int
    V: int
    dtype: np.dtype
    attrs: dict = field(default_factory=dict)
    has_grads: bool = False
    region: RawRegion | None = None
    kind: str = "full"
    D: int = 0  # TDT: the duration logits stored after the V token logits of each node

    @property
    def width(self) -> int:
        """Logits per lattice node as stored: ``V``, or ``V + D`` in a TDT dump."""
        return self.V + self.D

    @property
    def node_bytes(self) -> int:
        """Bytes read per lattice node: ``width`` logits, or a lattice's log-probs (three;
        a TDT lattice's ``2 + D``)."""
        if self.kind == "lattice":
            return (2 + self.D if self.D else 3) * self.dtype.itemsize
        return self.width * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.T * (self.U + 1) * self.node_bytes


@dataclass
class LatticeUtterance:
    """One utterance of a lattice dump, in the stored dtype: ``blank_lp (T, U+1)``
    log P(blank | t, u), ``emit_lp (T, U)`` log P(y_{u+1} | t, u), ``log_p2_others
    (T, U+1)`` log of the sum of p_v^2 over v neither blank nor y_{u+1};
    ``labels (U,)`` int64. A TDT lattice dump's: ``dur_lp (T, U+1, D)`` log Q(d_i |
    t, u) instead of ``log_p2_others`` (None)."""

    info: UttInfo
    labels: np.ndarray
    blank_lp: np.ndarray | None = None
    emit_lp: np.ndarray | None = None
    log_p2_others: np.ndarray | None = None  # (not read when only the loss is wanted)
    dur_lp: np.ndarray | None = None  # TDT lattice dumps only


@dataclass
class Utterance:
    """One utterance's data: ``logits (T, U+1, V)`` (a TDT dump's ``(T, U+1, V + D)``),
    ``labels (U,)`` int64."""

    info: UttInfo
    logits: np.ndarray
    labels: np.ndarray
    grads: np.ndarray | None = None


_MEMINFO_TTL = 0.25  # seconds a reading of /proc/meminfo is reused (it is per utterance)
_meminfo: list = [-1.0, 0]  # [when read (monotonic), MemAvailable in bytes]


def available_memory() -> int:
    """Bytes of memory this process could still allocate (MemAvailable on Linux, read at
    most every quarter second)."""
    now = time.monotonic()
    if now - _meminfo[0] < _MEMINFO_TTL:
        return _meminfo[1]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        _meminfo[:] = [now, int(line.split()[1]) * 1024]
        return _meminfo[1]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def check_memory(nbytes: int, what: str) -> None:
    """Raise ``DumpError(what: ...)`` if ``nbytes`` exceed the memory available."""
    avail = available_memory()
    if nbytes > avail:
        raise DumpError(f"{what} need {_gib(nbytes)}, more than the {_gib(avail)} of memory "
                        "available")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _is_integer(a: np.ndarray) -> bool:
    return a.dtype.kind in "iu"


class DumpReader:
    """Read a dump in either layout, one utterance at a time.

    ``DumpReader(path, blank=None, direct=True)``: ``blank`` overrides the
    file's; ``direct=False`` reads everything through HDF5 (no ``pread`` of raw
    regions). Raises ``DumpError`` (one line naming the file, and the
    utterance where there is one) for anything it cannot read or prove right.
    """

    def __init__(self, path: str | os.PathLike, blank: int | None = None,
                 direct: bool = True) -> None:
        self.path = os.fspath(path)
        self.name = show(self.path)
        self.direct = direct
        self._fd = -1
        self._f = None
        self.linked_files: list[str] = []  # files external links name (that exist)
        try:
            self._open()
            self._read_root(blank)
        except BaseException as e:
            self.close()
            if isinstance(e, (OSError, KeyError, ValueError, TypeError, RuntimeError)):
                raise DumpError(f"{self.name}: unreadable ({_first_line(e)})") from None
            raise

    # -- opening
    def _open(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise DumpError(f"{self.name}: no such file") from None
        except OSError as e:
            raise DumpError(f"{self.name}: cannot open ({e.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise DumpError(f"{self.name}: is {_kind(st.st_mode)}, not an HDF5 dump "
                            "(rnntool reads regular files only)")
        try:
            # O_NONBLOCK: should a FIFO be swapped in after the stat, opening does not hang.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise DumpError(f"{self.name}: cannot open ({e.strerror})") from None
        self._stat = os.fstat(self._fd)
        if not stat.S_ISREG(self._stat.st_mode) or (st.st_dev, st.st_ino) != (
                self._stat.st_dev, self._stat.st_ino):
            raise DumpError(f"{self.name}: changed while being opened")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise DumpError(f"{self.name}: not a readable HDF5 file ({_first_line(e)})") from None
        st_h5 = None  # the HDF5 driver's own descriptor: the same file as ours?
        with contextlib.suppress(Exception):
            st_h5 = os.fstat(self._f.id.get_vfd_handle())
        if st_h5 is not None and (st_h5.st_dev, st_h5.st_ino) != (self._stat.st_dev,
                                                                   self._stat.st_ino):
            raise DumpError(f"{self.name}: changed while being opened")
        self._check_unchanged()
        # Raw regions are read straight from the file only once one has been
        # proven to hold what HDF5 reads (a base address HDF5 accounts for and
        # we might not, e.g. a user block, would otherwise shift every read).
        self._direct_ok: bool | None = None
        self._external = self._has_external_links()
        self._checks = StorageChecks(self.name, self._stat.st_size, self._in_this_file)

    def _read_root(self, blank: int | None) -> None:
        f = self._f
        fmt = f.attrs.get("format")
        if fmt is not None and _attr_str(fmt) != FORMAT:
            raise DumpError(f"{self.name}: attribute format = {show(_attr_str(fmt))!r} is not "
                            f"{FORMAT!r}")
        version = self._root_int("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise DumpError(f"{self.name}: format_version {version} is newer than this rnntool "
                            f"reads ({FORMAT_VERSION}); upgrade rnntool")
        self.kind = self._dump_kind(version)
        self.model_kind, self.durations = self._model()
        utts = self._child(f, "utts")
        if self.kind == "lattice":
            if not isinstance(utts, h5py.Group):
                raise DumpError(f"{self.name}: attribute dump_kind = 'lattice' but there is no "
                                "group /utts (a lattice dump is keyed)")
            self._layout = _LatticeLayout(self, utts)
        elif utts is not None and isinstance(utts, h5py.Group):
            self._layout = _KeyedLayout(self, utts)
        elif all(k in f for k in ("logits", "labels", "logit_lengths", "label_lengths")):
            self._layout = _PaddedLayout(self)
        else:
            raise DumpError(
                f"{self.name}: neither layout: expected group /utts (keyed) or datasets "
                "logits, labels, logit_lengths, label_lengths (padded)"
            )
        self.layout = self._layout.kind
        self._ids = self._layout.ids
        kind = f.attrs.get("input_kind", "logits")
        self.input_kind = _attr_str(kind) if isinstance(kind, str | bytes) else None
        if self.input_kind not in INPUT_KINDS:
            raise DumpError(f"{self.name}: attribute input_kind = {_shown(kind)} is not one of "
                            f"{', '.join(INPUT_KINDS)}")
        self.vocab = self._read_vocab()
        self.vocab_size = self._vocab_size()
        self.blank = self._root_int("blank", 0) if blank is None else int(blank)
        if self.kind == "lattice" and blank is not None:
            self.blank = self._lattice_blank(int(blank))

    @property
    def frame_shift(self) -> float | None:
        """Seconds per logit frame: the root attribute ``frame_shift`` (``DumpWriter(...,
        frame_shift=)``), or None when the dump has none. Checked when first asked for
        (commands that need no seconds never read it): anything but one finite real
        number > 0 is a ``DumpError`` naming the file and the value."""
        if not hasattr(self, "_frame_shift"):
            self._frame_shift = self._read_frame_shift()
        return self._frame_shift

    def _read_frame_shift(self) -> float | None:
        if "frame_shift" not in self._f.attrs:
            return None
        try:
            v = np.asarray(self._f.attrs["frame_shift"])
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise DumpError(f"{self.name}: attribute frame_shift unreadable "
                            f"({_first_line(e)})") from None
        if v.size != 1 or v.dtype.kind not in "iuf":
            raise DumpError(f"{self.name}: attribute frame_shift = {_shown(v)} is not a number "
                            "(seconds per logit frame)")
        seconds = float(v.reshape(()))
        if not (np.isfinite(seconds) and seconds > 0):
            raise DumpError(f"{self.name}: attribute frame_shift = {_shown(v)} is not a finite "
                            "number of seconds > 0")
        return seconds

    def _model(self) -> tuple[str, tuple[int, ...] | None]:
        """``(model_kind, durations)``: the root attributes ``model_kind`` (absent:
        "rnnt") and, for "tdt", ``durations``, checked as ``tdt_loss`` checks them."""
        raw = self._f.attrs.get("model_kind", "rnnt")
        model = _attr_str(raw) if isinstance(raw, str | bytes) else None
        if model not in MODEL_KINDS:
            raise DumpError(f"{self.name}: attribute model_kind = {_shown(raw)} is not one of "
                            f"{', '.join(MODEL_KINDS)}")
        if model == "rnnt":
            return model, None
        if "durations" not in self._f.attrs:
            raise DumpError(f"{self.name}: attribute model_kind = 'tdt' but no attribute "
                            "durations (the duration set, e.g. [0, 1, 2, 3, 4])")
        v = np.asarray(self._f.attrs["durations"])
        if v.ndim != 1 or not _is_integer(v) or v.size > 4096:
            raise DumpError(f"{self.name}: attribute durations = {_shown(v)} is not a 1-D "
                            "integer array (the TDT duration set)")
        try:
            return model, check_dump_durations(v)
        except (ValueError, TypeError) as e:
            raise DumpError(f"{self.name}: attribute {_first_line(e)}") from None

    def _dump_kind(self, version: int) -> str:
        if "dump_kind" not in self._f.attrs:
            return "full"
        raw = self._f.attrs["dump_kind"]
        kind = _attr_str(raw) if isinstance(raw, str | bytes) else None
        if kind not in DUMP_KINDS:
            raise DumpError(f"{self.name}: attribute dump_kind = {_shown(raw)} is not one of "
                            f"{', '.join(DUMP_KINDS)}")
        if kind == "lattice" and version < 2:
            raise DumpError(f"{self.name}: attribute dump_kind = 'lattice' needs format_version "
                            f">= 2, the file has {version}")
        return kind

    def _lattice_blank(self, asked: int) -> int:
        """The file's blank, if ``asked`` is the same index: a lattice's blank was fixed
        when it was computed."""
        stored = self._root_int("blank", 0)
        V = self.vocab_size
        mine = normalise_blank(stored, V)
        if mine is None or normalise_blank(asked, V) != mine:
            raise DumpError(f"{self.name}: blank {asked} was asked for, but this lattice dump "
                            f"was computed with blank = {stored} (V = {V}); a lattice dump's "
                            "blank cannot be overridden")
        return stored

    def _root_int(self, name: str, default: int) -> int:
        if name not in self._f.attrs:
            return default
        v = np.asarray(self._f.attrs[name])
        if v.size != 1 or not _is_integer(v):
            raise DumpError(f"{self.name}: attribute {name} = {_shown(v)} is not an "
                            "integer")
        return int(v.reshape(()))

    def _decode_id(self, raw, where: str) -> str:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DumpError(f"{self.name}: utterance id {repr(raw)[2:-1]} {where} is not "
                                "UTF-8") from None
        return str(raw)

    def _has_external_links(self) -> bool:
        """Whether any link in the file is external (then every access checks its link);
        ``self.linked_files`` gets the regular files they name (an output must not
        replace one of them)."""
        names: list[bytes] = []

        def visit(name: bytes, info) -> None:
            if info.type == h5py.h5l.TYPE_EXTERNAL:
                names.append(name)

        self._f.id.links.visit(visit, info=True)  # names as bytes: no decoding here
        for name in names:
            link = self._f.get(name.decode("utf-8", "surrogateescape"), getlink=True)
            if isinstance(link, h5py.ExternalLink):
                self.linked_files += _external_candidates(self.path, link.filename)
        return bool(names)

    def _child(self, group, name: str):
        """``group[name]``, or None if absent; an external link is followed only to a
        regular file (HDF5 would open whatever the name resolves to, a FIFO included)."""
        link = group.get(name, getlink=True) if self._external else None
        if isinstance(link, h5py.ExternalLink):
            _check_external(self.name, group.file.filename, link)
        obj = group.get(name)
        if obj is None and group.id.links.exists(name.encode("utf-8", "surrogateescape")):
            link = link or group.get(name, getlink=True)
            raise DumpError(f"{self.name}: {show(group.name.rstrip('/'))}/{show(name)} is a "
                            f"link to {show(_link_target(link))}, which does not resolve")
        return obj

    def _in_this_file(self, obj) -> bool:
        # Without external links every object is in the file opened (and asking h5py
        # for an object's file costs more than the rest of the checks).
        return not self._external or obj.file.id == self._f.id

    def _small(self, ds: h5py.Dataset, where: str) -> np.ndarray:
        """Read a small auxiliary dataset whole, after checking its storage and size."""
        self._checks.raw_run(ds, where)
        check_memory(ds.size * max(ds.dtype.itemsize, 8), f"{self.name}: {where} would")
        self._checks.verify_filtered(ds, where)
        return np.asarray(ds[()])

    def _read_vocab(self) -> list[str] | None:
        if "vocab" not in self._f:
            return None
        ds = self._child(self._f, "vocab")
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            raise DumpError(f"{self.name}: /vocab must be a 1-D dataset of token names, got "
                            f"{getattr(ds, 'shape', type(ds).__name__)}")
        if ds.dtype.kind not in "SOU" or (ds.dtype.kind == "O"
                                          and h5py.check_string_dtype(ds.dtype) is None):
            raise DumpError(f"{self.name}: /vocab has dtype {ds.dtype}, not strings")
        names = []
        for v, raw in enumerate(self._small(ds, "/vocab").tolist()):
            if isinstance(raw, bytes):
                try:
                    raw = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DumpError(f"{self.name}: /vocab[{v}] is not UTF-8") from None
            names.append(str(raw))
        return names

    def _vocab_size(self) -> int:
        vs = self._root_int("vocab_size", -1)
        if self.kind == "lattice" and vs < 1:
            has = (f"attribute vocab_size = {vs}" if "vocab_size" in self._f.attrs
                   else "no attribute vocab_size")
            raise DumpError(f"{self.name}: a lattice dump must record the vocabulary size of "
                            f"its logits (attribute vocab_size >= 1); it has {has}")
        if vs == 0 or vs < -1:
            raise DumpError(f"{self.name}: attribute vocab_size = {vs}; it must be >= 1 "
                            "(or -1: not recorded)")
        if self.vocab is not None and vs > 0 and len(self.vocab) != vs:
            raise DumpError(f"{self.name}: /vocab has {len(self.vocab)} names but attribute "
                            f"vocab_size is {vs}")
        if vs > 0:
            return vs
        if self.vocab is not None:
            return len(self.vocab)
        if self.durations is not None and self._layout.V > 0:
            D = len(self.durations)
            if self._layout.V - D < 1:
                raise DumpError(f"{self.name}: /logits' last dim is {self._layout.V}, which "
                                f"leaves no token logit beside the D = {D} duration logits")
            return self._layout.V - D
        return self._layout.V

    def _check_unchanged(self, utt_id: str | None = None) -> None:
        """The file must still be the one opened, with the size and times it had."""
        try:
            now = os.fstat(self._fd)
            by_path = os.stat(self.path)
        except OSError:
            now = by_path = None
        if (now is None or _identity(now) != _identity(self._stat)
                or (by_path.st_dev, by_path.st_ino) != (now.st_dev, now.st_ino)):
            where = f" (reading utterance {show(utt_id)})" if utt_id is not None else ""
            if by_path is None:
                how = "it is gone"
            elif (by_path.st_dev, by_path.st_ino) != (self._stat.st_dev, self._stat.st_ino):
                how = "another file now has its name"
            elif by_path.st_size != self._stat.st_size:
                how = f"it had {self._stat.st_size} bytes, now {by_path.st_size}"
            else:
                how = "it was rewritten"
            raise DumpError(f"{self.name}: the file changed while it was being read{where}: "
                            f"{how}; score a copy that is not being written")

    # -- common
    def __enter__(self) -> DumpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(Exception):
                self._f.close()
            self._f = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def utt_ids(self) -> list[str]:
        return list(self._ids)

    def __contains__(self, utt_id: str) -> bool:
        return self._layout.contains(utt_id)

    def _err(self, utt_id: str, msg: str) -> DumpError:
        return DumpError(f"{self.name}: utterance {show(utt_id)}: {msg}")

    def info(self, utt_id: str) -> UttInfo:
        """Shape, dtype, storage and attrs of one utterance, checked, without reading its
        logits."""
        if utt_id not in self:
            raise DumpError(f"{self.name}: no utterance {show(utt_id)!r}")
        try:
            return self._info(utt_id)
        except DumpError as e:
            msg = str(e)
            if not msg.startswith(f"{self.name}: utterance "):
                msg = msg.replace(f"{self.name}: ", f"{self.name}: utterance {show(utt_id)}: ", 1)
            raise DumpError(msg) from None
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise self._err(utt_id, f"unreadable ({_first_line(e)})") from None

    def _info(self, utt_id: str) -> UttInfo:
        info = self._layout.info(utt_id)
        if self.durations is not None and info.kind == "lattice":
            info.D = len(self.durations)  # V is the dump's vocab_size: tokens already
        elif self.durations is not None:
            D = len(self.durations)
            if info.V - D < 1:
                raise self._err(utt_id, f"logits' last dim is {info.V}, but a TDT dump's logits "
                                f"are (T, U+1, V + D) with D = {D} durations "
                                f"{list(self.durations)}: no token logit is left")
            info.V, info.D = info.V - D, D
        if info.kind == "lattice":
            if info.dtype not in LATTICE_DTYPES:
                raise self._err(utt_id, f"lattice dtype {info.dtype} is not float32/64")
        elif info.dtype not in _FLOAT_DTYPES:
            raise self._err(utt_id, f"logits dtype {info.dtype} is not float16/32/64")
        if info.V < 1:
            raise self._err(utt_id, "V = 0: logits need at least one entry per node")
        if self.vocab_size > 0 and self.vocab_size != info.V:
            raise self._err(utt_id, f"V = {info.V} but the dump's vocab size is {self.vocab_size}"
                            + (f" (TDT: logits' last dim {info.width} = V + D, D = {info.D})"
                               if info.D else ""))
        if normalise_blank(self.blank, info.V) is None:
            raise DumpError(f"{self.name}: blank = {self.blank} is outside [-V, V) for V = "
                            f"{info.V}")
        return info

    def labels(self, utt_id: str, info: UttInfo | None = None) -> np.ndarray:
        """``(U,)`` int64 labels, checked against V and blank (values as stored)."""
        info = info or self.info(utt_id)
        try:
            y = self._layout.labels(utt_id, info)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise self._err(utt_id, f"labels unreadable ({_first_line(e)})") from None
        bad = bad_label(y, info.V, normalise_blank(self.blank, info.V))
        if bad is not None:
            raise self._err(utt_id, bad.message())
        self._check_unchanged(utt_id)
        return y.astype(np.int64)

    def read_logits_into(self, utt_id: str, info: UttInfo, out: np.ndarray, where=()) -> None:
        """Read ``(T, U+1, V)`` logits straight into ``out[where]``.

        ``out`` is a C-contiguous buffer of ``info.dtype``, e.g. a padded batch
        ``(B, T, U+1, V)`` with ``where = np.s_[b, :T, :U+1]``: raw data is read
        from the file with ``preadv`` into it, anything else by HDF5 in place.
        """
        dest = out[where] if where != () else out
        try:
            if info.region is not None and self._direct_allowed(info):
                self._pread(info, dest)
            else:
                src, sel, name = self._layout.logits(utt_id, info)
                self._checks.verify_filtered(src, name)
                if out.dtype == src.dtype and out.flags.c_contiguous:
                    src.read_direct(out, sel, np.s_[where] if where != () else np.s_[...])
                else:
                    dest[...] = src[sel]
        except DumpError:
            raise
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise self._err(utt_id, f"logits unreadable ({_first_line(e)})") from None
        self._check_unchanged(utt_id)

    def _direct_allowed(self, info: UttInfo) -> bool:
        if not self.direct:
            return False
        if self._direct_ok is None:
            self._direct_ok = self._probe(info)
        return self._direct_ok

    def _probe(self, info: UttInfo) -> bool:
        """Does a direct read of the first frame give exactly what HDF5 reads?"""
        one = np.empty((1, info.U + 1, info.width), info.dtype)
        try:
            self._pread(info, one)
        except DumpError:
            return False
        src, sel, _ = self._layout.logits(info.utt_id, info, frames=1)
        return one.tobytes() == np.ascontiguousarray(src[sel], info.dtype).tobytes()

    def _pread(self, info: UttInfo, dest: np.ndarray) -> None:
        """Read the utterance's raw region into ``dest`` ``(T, U+1, V)`` (C-contiguous rows)."""
        short = info.region.read_into(self._fd, dest, info.dtype.itemsize)
        if short is not None:
            self._check_unchanged(info.utt_id)
            raise self._err(info.utt_id, f"the file ends inside its logits ({short.got} of "
                            f"{short.want} bytes at offset {short.offset})")

    def read(self, utt_id: str, with_grads: bool = False) -> Utterance:
        """One utterance, validated (not for finiteness: the engine reports NaN losses)."""
        if self.kind == "lattice":
            raise self._err(utt_id, _NO_LOGITS)
        info = self.info(utt_id)
        y = self.labels(utt_id, info)
        check_memory(info.nbytes * (2 if with_grads and info.has_grads else 1),
                     f"{self.name}: utterance {show(utt_id)}: its logits")
        x = np.empty((info.T, info.U + 1, info.width), info.dtype)
        self.read_logits_into(utt_id, info, x)
        grads = None
        if with_grads and info.has_grads:
            try:
                ds, name = self._layout.grads(utt_id)
                self._checks.verify_filtered(ds, name)
                grads = np.asarray(ds[()])
            except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
                raise self._err(utt_id, f"grads unreadable ({_first_line(e)})") from None
            self._check_unchanged(utt_id)
        return Utterance(info, x, y, grads)

    @property
    def lattice_names(self) -> tuple[str, ...]:
        """The per-utterance arrays of this dump's lattice kind: ``LATTICE_DATASETS``, or
        a TDT dump's ``TDT_LATTICE_DATASETS``."""
        return tuple(TDT_LATTICE_DATASETS if self.model_kind == "tdt" else LATTICE_DATASETS)

    def read_lattice(self, utt_id: str, info: UttInfo | None = None,
                     names: Sequence[str] | None = None) -> LatticeUtterance:
        """One utterance of a lattice dump, validated: labels as ``labels`` checks them,
        and no NaN or +inf in its log-probs (-inf is a probability of 0); in a TDT
        lattice dump every ``dur_lp`` row a distribution over the durations (logsumexp
        within ``dump.log_prob_tolerance`` of 0: the stored dtype's epsilon, float16's
        for a dump made from log-probs). ``names``: the arrays to read (the others are
        None; default ``lattice_names``: all), e.g. ``("blank_lp", "emit_lp")`` for an
        RNN-T loss alone. Raises ``DumpError`` (one line) for anything else."""
        if names is None:
            names = self.lattice_names
        info = info or self.info(utt_id)
        if info.kind != "lattice":
            raise self._err(utt_id, "a full dump holds logits, not a lattice (read it with "
                            "read())")
        y = self.labels(utt_id, info)
        check_memory(info.nbytes, f"{self.name}: utterance {show(utt_id)}: its lattice would")
        arrays = {}
        try:
            for name, (ds, run) in self._layout.lattice(utt_id).items():
                if name not in names:
                    continue
                shape = lattice_shapes(self.model_kind, info.T, info.U, info.D)[name]
                if run is not None and self._lattice_direct(ds, run, shape, info.dtype):
                    arrays[name] = self._pread_array(utt_id, name, run, shape, info.dtype)
                    continue
                self._checks.verify_filtered(ds, f"utterance {show(utt_id)}: {name}")
                arrays[name] = np.asarray(ds[()]).astype(info.dtype, copy=False)
        except DumpError:
            raise
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            raise self._err(utt_id, f"lattice unreadable ({_first_line(e)})") from None
        self._check_unchanged(utt_id)
        for name, a in arrays.items():
            bad = np.isnan(a) | np.isposinf(a)
            if bad.any():
                at = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))
                where = ", ".join(f"{k}={i}" for k, i in zip(("t", "u", "i"), at, strict=False))
                more = int(bad.sum()) - 1
                raise self._err(utt_id, f"{name}[{where}] = {float(a[at])!r}"
                                + (f" (and {more} more)" if more else "")
                                + "; a lattice dump holds finite log-probs or -inf")
        if "dur_lp" in arrays:
            self._check_durations_normalise(utt_id, arrays["dur_lp"])
        return LatticeUtterance(info, y, **arrays)

    def _check_durations_normalise(self, utt_id: str, dur_lp: np.ndarray) -> None:
        """``DumpError`` naming the first ``dur_lp[t, u]`` row whose logsumexp is not 0
        within rounding (``log_prob_tolerance``): stage 2 reads Q(d | t, u) as a
        distribution over the durations."""
        D = dur_lp.shape[-1]
        eps = np.finfo(np.float16 if self.input_kind == "log_probs" else dur_lp.dtype).eps
        tol = log_prob_tolerance(float(eps), D)
        c = dur_lp.astype(np.float64)
        m = c.max(axis=-1, initial=-np.inf)
        with np.errstate(all="ignore"):
            lse = np.where(np.isfinite(m), m + np.log(np.exp(c - m[..., None]).sum(axis=-1)),
                           -np.inf)
        off = ~(np.abs(lse) <= tol)
        if off.any():
            t, u = (int(i) for i in np.unravel_index(int(np.argmax(off)), off.shape))
            more = int(off.sum()) - 1
            raise self._err(utt_id, f"dur_lp[t={t}, u={u}, :] has logsumexp {float(lse[t, u]):.6g}"
                            + (f" (and {more} more rows)" if more else "")
                            + f", not 0 within {tol:.2g}: not the log-probs of a distribution "
                            f"over the {D} durations")

    def _lattice_direct(self, ds, run, shape, dtype) -> bool:
        """May a lattice array stored raw be read with ``pread``? Once per file, the first
        such array is read both ways and must give the same bytes (as ``_probe``)."""
        if not self.direct:
            return False
        if self._direct_ok is None:
            try:
                mine = self._pread_array("", "", run, shape, dtype)
            except DumpError:
                mine = None
            theirs = np.ascontiguousarray(ds[()], dtype)
            self._direct_ok = mine is not None and mine.tobytes() == theirs.tobytes()
        return self._direct_ok

    def _pread_array(self, utt_id: str, name: str, run, shape, dtype) -> np.ndarray:
        """A raw run ``(offset, bytes)`` read into a new ``shape`` array of ``dtype``."""
        a = np.empty(shape, dtype)
        got = preadv_all(self._fd, [memoryview(a).cast("B")], run[0])
        if got != a.nbytes:
            self._check_unchanged(utt_id)
            raise self._err(utt_id, f"the file ends inside its {name} ({got} of {a.nbytes} "
                            f"bytes at offset {run[0]})")
        return a

    def has_stored_loss(self, utt_id: str) -> bool:
        """Whether the utterance carries a trainer's loss (attribute ``loss``), without
        reading or checking anything else (a table's columns are chosen with it). Its
        group is looked up as every access does (``_child``: an external link only to a
        regular file; HDF5 would open a FIFO and wait for a writer forever)."""
        if self.layout != "keyed" or not self._layout.contains(utt_id):
            return False
        try:
            g = self._child(self._layout._utts, utt_id)
            return isinstance(g, h5py.Group) and "loss" in g.attrs
        except (DumpError, KeyError, OSError, ValueError, TypeError, RuntimeError):
            return False  # reported when the utterance is read

    def checked(self, utt_ids: Sequence[str]) -> list[tuple[UttInfo, np.ndarray]]:
        """``(info, labels)`` of every utterance, all validated, in the order given."""
        items = []
        for u in utt_ids:
            info = self.info(u)
            items.append((info, self.labels(u, info)))
        return items

    def batches(
        self, utt_ids: Sequence[str], budget_bytes: int
    ) -> Iterator[list[tuple[UttInfo, np.ndarray]]]:
        """``group_by_budget`` of the utterances, every one validated before any is yielded."""
        return group_by_budget(self.checked(utt_ids), budget_bytes)

    def file_size(self) -> int:
        return self._stat.st_size


# --------------------------------------------------------------------------- layouts
# What a layout stores where. Each class has the same attributes and methods, which
# DumpReader calls and nothing else does:
#
#   kind                     "keyed" | "padded" (DumpReader.layout; a lattice dump's is
#                            "keyed")
#   ids                      the utterance ids, in the file's order
#   V                        the vocabulary size the layout fixes, -1 if none
#   contains(utt_id)         whether the dump has that utterance
#   info(utt_id)             its UttInfo, lengths and storage checked (DumpReader adds
#                            the checks every layout shares: dtype, V, blank)
#   labels(utt_id, info)     its (U,) labels as stored (DumpReader checks their values)
#   logits(utt_id, info, frames=None)
#                            (dataset, selection, name for messages) of its logits
#                            (T, U+1, V), or only their first ``frames`` frames
#   grads(utt_id)            (dataset, name) of its stored gradient (info.has_grads)
#   lattice(utt_id)          {name: dataset} of its lattice arrays (info.kind "lattice")
#
# Each takes the reader for what is shared: _child (links), _checks (storage),
# _small (small datasets), _decode_id, _err, name.


class _KeyedLayout:
    """``/utts/<utt_id>/{logits,labels,grads}``, one group per utterance (DumpWriter's)."""

    kind = "keyed"
    V = -1  # each utterance has its own logits: nothing fixes V before one is read

    def __init__(self, r: DumpReader, utts: h5py.Group) -> None:
        self._r = r
        self._utts = utts
        names = list(utts)  # (not decoded inside h5py's iteration, which holds a lock)
        self.ids = [r._decode_id(k, "in /utts") for k in names]
        self._idset = set(self.ids)
        self._labels_read: tuple[str | None, np.ndarray | None] = (None, None)

    def contains(self, utt_id: str) -> bool:
        return isinstance(utt_id, str) and utt_id in self._idset

    def _group(self, utt_id: str) -> h5py.Group:
        g = self._r._child(self._utts, utt_id)
        if not isinstance(g, h5py.Group):
            raise self._r._err(utt_id, "is not a group")
        return g

    def _datasets(self, utt_id: str, g: h5py.Group, names: Sequence[str]) -> list[h5py.Dataset]:
        """The datasets ``names`` of the utterance's group, each present and a dataset."""
        found = []
        for name in names:
            ds = self._r._child(g, name)
            if ds is None:
                raise self._r._err(utt_id, f"missing dataset {name}")
            if not isinstance(ds, h5py.Dataset):
                raise self._r._err(utt_id, f"{name} is not a dataset")
            found.append(ds)
        return found

    def _load_labels(self, utt_id: str, y: h5py.Dataset) -> None:
        """Check the labels' storage and read them (for ``labels()``, next)."""
        r = self._r
        r._checks.raw_run(y, "labels")
        check_memory(y.size * 8, f"{r.name}: utterance {show(utt_id)}: its labels would")
        r._checks.verify_filtered(y, f"utterance {show(utt_id)}: labels")
        self._labels_read = (utt_id, np.asarray(y[()]))

    def info(self, utt_id: str) -> UttInfo:
        r = self._r
        g = self._group(utt_id)
        x, y = self._datasets(utt_id, g, ("logits", "labels"))
        if x.ndim != 3:
            raise r._err(utt_id, f"logits must be (T, U+1, V), got shape {x.shape}")
        if y.ndim != 1:
            raise r._err(utt_id, f"labels must be (U,), got shape {y.shape}")
        T, U1, V = x.shape
        if T == 0:
            raise r._err(utt_id, "T = 0, an utterance needs T >= 1")
        if y.shape[0] != U1 - 1:
            raise r._err(utt_id, f"{y.shape[0]} labels but logits have U+1 = {U1}")
        if y.dtype.kind not in "iu":
            raise r._err(utt_id, f"labels dtype {y.dtype} is not an integer type")
        attrs = self._attrs(utt_id, g)
        stored = r._checks.raw_run(x, "logits")
        self._load_labels(utt_id, y)
        grads = r._child(g, "grads") if "grads" in g else None
        if grads is not None:
            if not isinstance(grads, h5py.Dataset) or grads.shape != x.shape:
                raise r._err(utt_id, f"grads shape {getattr(grads, 'shape', None)} != logits "
                             f"{x.shape}")
            if native(grads.dtype) not in _FLOAT_DTYPES:
                raise r._err(utt_id, f"grads dtype {grads.dtype} is not float16/32/64")
            r._checks.raw_run(grads, "grads")
        region = None if stored is None else RawRegion(stored[0], (T, U1, V))
        return UttInfo(utt_id, T, U1 - 1, V, native(x.dtype), attrs, grads is not None, region)

    def _attrs(self, utt_id: str, g: h5py.Group) -> dict:
        """The attributes rnntool uses (``loss``: a real number; ``text``: a string),
        checked; any other attribute is ignored."""
        attrs = {}
        if "loss" in g.attrs:
            v = np.asarray(g.attrs["loss"])
            if v.size != 1 or v.dtype.kind not in "iuf" or v.dtype == np.bool_:
                raise self._r._err(utt_id, f"attribute loss = {_shown(v)} is not a number")
            attrs["loss"] = float(v.reshape(()))
        if "text" in g.attrs:
            v = g.attrs["text"]
            if not isinstance(v, str | bytes):
                raise self._r._err(utt_id, f"attribute text = {_shown(v)} is not a string")
            try:
                attrs["text"] = v.decode("utf-8") if isinstance(v, bytes) else v
            except UnicodeDecodeError:
                raise self._r._err(utt_id, "attribute text is not UTF-8") from None
        return attrs

    def labels(self, utt_id: str, info: UttInfo) -> np.ndarray:
        if self._labels_read[0] == utt_id:
            return self._labels_read[1]
        return np.asarray(self._r._child(self._utts, utt_id)["labels"][()])

    def logits(self, utt_id: str, info: UttInfo, frames: int | None = None):
        ds = self._r._child(self._utts, utt_id)["logits"]
        return ds, np.s_[...] if frames is None else np.s_[:frames], \
            f"utterance {show(utt_id)}: logits"

    def grads(self, utt_id: str):
        return self._r._child(self._utts, utt_id)["grads"], f"utterance {show(utt_id)}: grads"

    def lattice(self, utt_id: str):
        raise KeyError("lattice")  # never asked: a full dump's info has kind "full"


_NO_LOGITS = 'a lattice dump holds no logits (it was written with kind="lattice")'
_LATTICE_FORMS = {"blank_lp": "(T, U+1)", "emit_lp": "(T, U)", "log_p2_others": "(T, U+1)",
                  "dur_lp": "(T, U+1, D)"}


class _LatticeLayout(_KeyedLayout):
    """``/utts/<utt_id>/{blank_lp,emit_lp,log_p2_others,labels}`` of a lattice dump
    (a TDT one's: ``{blank_lp,emit_lp,dur_lp,labels}``): keyed, attributes as a full
    dump's; no logits, no grads. V is the dump's vocab_size (required)."""

    def info(self, utt_id: str) -> UttInfo:
        r = self._r
        g = self._group(utt_id)
        names = r.lattice_names
        D = 0 if r.durations is None else len(r.durations)
        *arrays, y = self._datasets(utt_id, g, (*names, "labels"))
        named = dict(zip(names, arrays, strict=True))
        for name, ds in named.items():
            if ds.ndim != (3 if name == "dur_lp" else 2):
                raise r._err(utt_id, f"{name} must be {_LATTICE_FORMS[name]}, got shape "
                             f"{ds.shape}")
        if y.ndim != 1:
            raise r._err(utt_id, f"labels must be (U,), got shape {y.shape}")
        b = named["blank_lp"]
        T, U = b.shape[0], y.shape[0]
        if T == 0:
            raise r._err(utt_id, "T = 0, an utterance needs T >= 1")
        shapes = lattice_shapes(r.model_kind, T, U, D)
        for name, ds in named.items():
            want = shapes[name]
            if ds.shape != want:
                source = (f"labels {y.shape}" if name == "blank_lp"
                          else f"blank_lp {b.shape} and labels {y.shape}")
                if name == "dur_lp":
                    source += f" and the {D} durations"
                raise r._err(utt_id, f"{name} has shape {ds.shape}, but {source} make it "
                             f"{_LATTICE_FORMS[name]} = {want}")
        stored = {name: ds.dtype for name, ds in named.items()}  # (h5py builds it per call)
        dtype = native(stored["blank_lp"])
        for name, t in stored.items():
            if native(t) not in LATTICE_DTYPES:
                raise r._err(utt_id, f"{name} dtype {t} is not float32/64 (a lattice "
                             "dump holds float32 or float64)")
            if native(t) != dtype:
                raise r._err(utt_id, f"{name} dtype {t} differs from blank_lp's "
                             f"{stored['blank_lp']}; a lattice dump's arrays share one dtype")
        if y.dtype.kind not in "iu":
            raise r._err(utt_id, f"labels dtype {y.dtype} is not an integer type")
        attrs = self._attrs(utt_id, g)
        regions = {name: r._checks.raw_run(ds, name) for name, ds in named.items()}
        self._load_labels(utt_id, y)
        # For lattice(), next: the datasets not looked up twice.
        self._sets_read = (utt_id, named, regions)
        return UttInfo(utt_id, T, U, r.vocab_size, dtype, attrs, kind="lattice")

    def logits(self, utt_id: str, info: UttInfo, frames: int | None = None):
        raise self._r._err(utt_id, _NO_LOGITS)

    def grads(self, utt_id: str):
        raise KeyError("grads")  # never asked: a lattice dump's info has has_grads False

    def lattice(self, utt_id: str) -> dict[str, tuple[h5py.Dataset, tuple[int, int] | None]]:
        """``{name: (dataset, raw run)}`` of the utterance's three arrays, the raw run
        ``(byte offset, bytes)`` when the array may be read straight from the file
        (``StorageChecks.raw_run``)."""
        cached = getattr(self, "_sets_read", (None,))
        if cached[0] == utt_id:
            _, named, regions = cached
        else:
            g = self._group(utt_id)
            named = {name: self._r._child(g, name) for name in self._r.lattice_names}
            regions = {name: self._r._checks.raw_run(ds, name) for name, ds in named.items()}
        return {name: (named[name], regions[name]) for name in self._r.lattice_names}


class _PaddedLayout:
    """Root datasets of a padded batch, as a training loop dumps it: ``logits (B, T,
    U+1, V)``, ``labels (B, Umax)``, ``logit_lengths (B,)``, ``label_lengths (B,)``,
    optional ``utt_ids (B,)`` (else the batch index). No grads."""

    kind = "padded"

    def __init__(self, r: DumpReader) -> None:
        self._r = r
        f = r._f
        x = r._child(f, "logits")
        if not isinstance(x, h5py.Dataset) or x.ndim != 4:
            raise DumpError(f"{r.name}: /logits must be a (B, T, U+1, V) dataset, got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
        self._logits = x
        self.V = int(x.shape[-1])
        B = x.shape[0]
        arrays = {}
        for name in ("logit_lengths", "label_lengths", "labels"):
            ds = r._child(f, name)
            want = 2 if name == "labels" else 1
            if not isinstance(ds, h5py.Dataset) or ds.ndim != want:
                raise DumpError(f"{r.name}: /{name} must be a {want}-D dataset, got "
                                f"{getattr(ds, 'shape', type(ds).__name__)}")
            if ds.dtype.kind not in "iu":
                raise DumpError(f"{r.name}: /{name} has dtype {ds.dtype}, not an integer type")
            if ds.shape[0] != B:
                raise DumpError(f"{r.name}: batch sizes disagree: /logits has {B}, /{name} "
                                f"{ds.shape[0]}")
            r._checks.raw_run(ds, f"/{name}")
            arrays[name] = ds
        self._labels = arrays["labels"]
        r._checks.verify_filtered(self._labels, "/labels")  # no short chunk read as labels
        self._t_len = r._small(arrays["logit_lengths"], "/logit_lengths")
        self._u_len = r._small(arrays["label_lengths"], "/label_lengths")
        if "utt_ids" in f:
            ds = r._child(f, "utt_ids")
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] != B:
                raise DumpError(f"{r.name}: /utt_ids must be (B,) = ({B},), got "
                                f"{getattr(ds, 'shape', type(ds).__name__)}")
            if ds.dtype.kind not in "iuSOU":
                raise DumpError(f"{r.name}: /utt_ids has dtype {ds.dtype}, neither strings "
                                "nor integers")
            raw = r._small(ds, "/utt_ids")
            self.ids = [r._decode_id(v, f"at /utt_ids[{b}]") if isinstance(v, bytes | str)
                        else str(int(v)) for b, v in enumerate(raw.tolist())]
        else:
            self.ids = [str(b) for b in range(B)]
        self._index: dict[str, int] = {}
        for b, u in enumerate(self.ids):
            if not u:
                raise DumpError(f"{r.name}: /utt_ids[{b}] is empty")
            if u in self._index:
                raise DumpError(f"{r.name}: utterance id {show(u)} appears twice in /utt_ids "
                                f"(entries {self._index[u]} and {b})")
            self._index[u] = b
        self._storage = r._checks.raw_run(x, "/logits")

    def contains(self, utt_id: str) -> bool:
        return utt_id in self._index

    def info(self, utt_id: str) -> UttInfo:
        r = self._r
        b = self._index[utt_id]
        x = self._logits
        T_b, U_b = int(self._t_len[b]), int(self._u_len[b])  # exact, whatever the int type
        broken = length_faults(T_b, U_b, x.shape[1], x.shape[2], self._labels.shape[1])
        if broken["T_negative"] or broken["T_zero"]:
            raise r._err(utt_id, f"logit_lengths[{b}] = {T_b}, an utterance needs T >= 1")
        if broken["U_negative"]:
            raise r._err(utt_id, f"label_lengths[{b}] = {U_b} is negative")
        if broken["T_over"]:
            raise r._err(utt_id, f"logit_lengths[{b}] = {T_b} exceeds the padded T = "
                         f"{x.shape[1]}")
        if broken["U_over"] or broken["U_over_labels"]:
            raise r._err(utt_id, f"label_lengths[{b}] = {U_b} exceeds the padded U+1 = "
                         f"{x.shape[2]} or the labels' width {self._labels.shape[1]}")
        region = None
        if self._storage is not None:
            per_utt = self._storage[1] // x.shape[0]
            region = RawRegion(self._storage[0] + b * per_utt, tuple(x.shape[1:]))
        return UttInfo(utt_id, T_b, U_b, int(x.shape[3]), native(x.dtype), region=region)

    def labels(self, utt_id: str, info: UttInfo) -> np.ndarray:
        return np.asarray(self._labels[self._index[utt_id], : info.U])

    def logits(self, utt_id: str, info: UttInfo, frames: int | None = None):
        T = info.T if frames is None else frames
        return self._logits, np.s_[self._index[utt_id], :T, : info.U + 1, :], "/logits"

    def grads(self, utt_id: str):
        raise KeyError("grads")  # never asked: a padded dump's info has has_grads False

    def lattice(self, utt_id: str):
        raise KeyError("lattice")  # never asked: a padded dump's info has kind "full"


def _link_target(link) -> str:
    if isinstance(link, h5py.ExternalLink):
        return f"{link.filename}:{link.path}"
    return getattr(link, "path", type(link).__name__)


def probe(path: str | os.PathLike, blank: int | None = None) -> None:
    """Open ``path`` as ``DumpReader`` does, in a forked child process, first.

    A file crafted to crash the HDF5 library itself (a B-tree node that points to
    itself, groups nested tens of thousands deep) kills the process that parses
    it; here that is the child, and the crash becomes a ``DumpError``. Opening
    walks every link of every group, so the structure a command touches has been
    parsed once. Any other failure is left to the caller's own open (same error).
    """
    if not hasattr(os, "fork"):
        return
    import signal

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # not the parent's handlers
                signal.signal(getattr(signal, name), signal.SIG_DFL)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            DumpReader(path, blank=blank).close()
        except BaseException:
            code = 3
        os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:  # interrupted: never leave the child parsing a hostile file
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        raise DumpError(f"{show(os.fspath(path))}: the HDF5 library crashed ({sig}) reading the "
                        "file's structure: the file is corrupt")


def _external_candidates(parent: str, target: str) -> list[str]:
    """Where HDF5 may look for an external link's file (HDF5_EXT_PREFIX, the linking
    file's directory, the name as given), those that exist."""
    candidates = []
    base = os.path.basename(target)
    prefix = os.environ.get("HDF5_EXT_PREFIX")
    for p in (prefix.split(os.pathsep) if prefix else []):
        candidates.append(os.path.join(p, base))
    if os.path.isabs(target):
        candidates.append(target)
    here = os.path.dirname(os.path.abspath(parent))
    candidates += [os.path.join(here, base), os.path.join(here, target), target]
    return [c for c in dict.fromkeys(candidates) if os.path.lexists(c)]


def _check_external(name: str, parent: str, link: h5py.ExternalLink) -> None:
    """Refuse an external link whose target, wherever HDF5 may look for it, is not a
    regular file (HDF5 would open a FIFO and wait, or a device and read it)."""
    found = _external_candidates(parent, link.filename)
    for c in found:
        try:
            st = os.stat(c)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise DumpError(f"{name}: external link to {show(link.filename)}: {show(c)} is "
                            f"{_kind(st.st_mode)}, not a regular file")
    if not found:
        raise DumpError(f"{name}: external link to {show(link.filename)}, which does not exist")


def group_by_budget(
    items: Sequence[tuple[UttInfo, np.ndarray]], budget_bytes: int
) -> Iterator[list[tuple[UttInfo, np.ndarray]]]:
    """Group ``(info, labels)`` items for the engine: sorted by size so padding is small,
    each group of one kind, one dtype and one V with what is read for its padded
    lattice (``node_bytes`` per node) within ``budget_bytes`` (a larger utterance
    goes alone)."""
    order = sorted(items, key=lambda it: (it[0].kind, it[0].dtype.str, it[0].V,
                                          it[0].T * (it[0].U + 1), it[0].utt_id))
    group: list[tuple[UttInfo, np.ndarray]] = []
    T = U1 = 0
    for it in order:
        info = it[0]
        t, u1 = max(T, info.T), max(U1, info.U + 1)
        grown = (len(group) + 1) * t * u1 * info.node_bytes
        first = group[0][0] if group else info
        if group and (grown > budget_bytes or info.dtype != first.dtype or info.V != first.V
                      or info.kind != first.kind):
            yield group
            group, t, u1 = [], info.T, info.U + 1
        group.append(it)
        T, U1 = t, u1
    if group:
        yield group


def padded_bytes(infos: Sequence[UttInfo]) -> int:
    T = max(i.T for i in infos)
    U1 = max(i.U for i in infos) + 1
    return len(infos) * T * U1 * infos[0].node_bytes


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return show(text.splitlines()[0])


def _attr_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _shown(v) -> str:
    """An attribute's value for a message: strings quoted, numbers and arrays as numpy
    prints them, on one line."""
    v = _attr_value(v)
    text = repr(v) if isinstance(v, str) else str(v)
    return show(" ".join(text.split()))


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, np.generic):
        return v.item()
    return v


__all__ = ["DumpReader", "UttInfo", "Utterance", "LatticeUtterance", "group_by_budget",
           "padded_bytes",
           "available_memory", "check_memory", "show"]
