"""Reading dumps (keyed or padded layout) one utterance at a time, as untrusted input.

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
"""

from __future__ import annotations

import contextlib
import os
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from .dump import _FLOAT_DTYPES, FORMAT, FORMAT_VERSION, INPUT_KINDS, DumpError

_IOV_MAX = 1024  # buffers per preadv call (Linux's IOV_MAX)


def show(text) -> str:
    """``text`` for a one-line message: printable as it is, else backslash-escaped
    (a newline or terminal escape in an id or path cannot break or forge a line)."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


# --------------------------------------------------------------------------- infos
@dataclass
class UttInfo:
    """What is known of an utterance without reading its logits.

    ``region`` is ``(byte offset, (T', U'+1, V))`` of its logits stored raw in
    the file (for the padded layout the utterance's whole padded slab), or None
    when they must be read through HDF5.
    """

    utt_id: str
    T: int
    U: int
    V: int
    dtype: np.dtype
    attrs: dict = field(default_factory=dict)
    has_grads: bool = False
    region: tuple[int, tuple[int, int, int]] | None = None

    @property
    def nbytes(self) -> int:
        return self.T * (self.U + 1) * self.V * self.dtype.itemsize


@dataclass
class Utterance:
    """One utterance's data: ``logits (T, U+1, V)``, ``labels (U,)`` int64."""

    info: UttInfo
    logits: np.ndarray
    labels: np.ndarray
    grads: np.ndarray | None = None


def available_memory() -> int:
    """Bytes of memory this process could still allocate (MemAvailable on Linux)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            line = next(x for x in f if x.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
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
        self._labels_read: tuple[str | None, np.ndarray | None] = (None, None)
        self._verified: set = set()  # filtered datasets whose chunks were checked
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
        with contextlib.suppress(Exception):  # the HDF5 driver's own descriptor: the same file?
            st_h5 = os.fstat(self._f.id.get_vfd_handle())
            if (st_h5.st_dev, st_h5.st_ino) != (self._stat.st_dev, self._stat.st_ino):
                raise DumpError(f"{self.name}: changed while being opened")
        self._check_unchanged()
        # Raw regions are read straight from the file only once one has been
        # proven to hold what HDF5 reads (a base address HDF5 accounts for and
        # we might not, e.g. a user block, would otherwise shift every read).
        self._direct_ok: bool | None = None
        self._external = self._has_external_links()

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
        utts = self._child(f, "utts")
        if utts is not None and isinstance(utts, h5py.Group):
            self.layout = "keyed"
            self._utts = utts
            names = list(utts)  # (not decoded inside h5py's iteration, which holds a lock)
            self._ids = [self._decode_id(k, "in /utts") for k in names]
        elif all(k in f for k in ("logits", "labels", "logit_lengths", "label_lengths")):
            self.layout = "padded"
            self._init_padded()
        else:
            raise DumpError(
                f"{self.name}: neither layout: expected group /utts (keyed) or datasets "
                "logits, labels, logit_lengths, label_lengths (padded)"
            )
        kind = f.attrs.get("input_kind", "logits")
        self.input_kind = _attr_str(kind) if isinstance(kind, str | bytes) else None
        if self.input_kind not in INPUT_KINDS:
            raise DumpError(f"{self.name}: attribute input_kind = {_shown(kind)} is not one of "
                            f"{', '.join(INPUT_KINDS)}")
        self.vocab = self._read_vocab()
        self.vocab_size = self._vocab_size()
        self.blank = self._root_int("blank", 0) if blank is None else int(blank)

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
        if self._external and isinstance(group.get(name, getlink=True), h5py.ExternalLink):
            _check_external(self.name, group.file.filename, group.get(name, getlink=True))
        obj = group.get(name)
        if obj is None and group.id.links.exists(name.encode("utf-8", "surrogateescape")):
            link = group.get(name, getlink=True)
            raise DumpError(f"{self.name}: {show(group.name.rstrip('/'))}/{show(name)} is a "
                            f"link to {show(_link_target(link))}, which does not resolve")
        return obj

    def _in_this_file(self, obj) -> bool:
        # Without external links every object is in the file opened (and asking h5py
        # for an object's file costs more than the rest of the checks).
        return not self._external or obj.file.id == self._f.id

    # -- padded layout
    def _init_padded(self) -> None:
        f = self._f
        x = self._child(f, "logits")
        if not isinstance(x, h5py.Dataset) or x.ndim != 4:
            raise DumpError(f"{self.name}: /logits must be a (B, T, U+1, V) dataset, got "
                            f"{getattr(x, 'shape', type(x).__name__)}")
        self._logits = x
        B = x.shape[0]
        arrays = {}
        for name in ("logit_lengths", "label_lengths", "labels"):
            ds = self._child(f, name)
            want = 2 if name == "labels" else 1
            if not isinstance(ds, h5py.Dataset) or ds.ndim != want:
                raise DumpError(f"{self.name}: /{name} must be a {want}-D dataset, got "
                                f"{getattr(ds, 'shape', type(ds).__name__)}")
            if ds.dtype.kind not in "iu":
                raise DumpError(f"{self.name}: /{name} has dtype {ds.dtype}, not an integer type")
            if ds.shape[0] != B:
                raise DumpError(f"{self.name}: batch sizes disagree: /logits has {B}, /{name} "
                                f"{ds.shape[0]}")
            self._storage(ds, f"/{name}")
            arrays[name] = ds
        self._labels = arrays["labels"]
        self._t_len = self._small(arrays["logit_lengths"], "/logit_lengths")
        self._u_len = self._small(arrays["label_lengths"], "/label_lengths")
        if "utt_ids" in f:
            ds = self._child(f, "utt_ids")
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] != B:
                raise DumpError(f"{self.name}: /utt_ids must be (B,) = ({B},), got "
                                f"{getattr(ds, 'shape', type(ds).__name__)}")
            if ds.dtype.kind not in "iuSOU":
                raise DumpError(f"{self.name}: /utt_ids has dtype {ds.dtype}, neither strings "
                                "nor integers")
            raw = self._small(ds, "/utt_ids")
            self._ids = [self._decode_id(v, f"at /utt_ids[{b}]") if isinstance(v, bytes | str)
                         else str(int(v)) for b, v in enumerate(raw.tolist())]
        else:
            self._ids = [str(b) for b in range(B)]
        self._index: dict[str, int] = {}
        for b, u in enumerate(self._ids):
            if not u:
                raise DumpError(f"{self.name}: /utt_ids[{b}] is empty")
            if u in self._index:
                raise DumpError(f"{self.name}: utterance id {show(u)} appears twice in /utt_ids "
                                f"(entries {self._index[u]} and {b})")
            self._index[u] = b
        self._logits_storage = self._storage(x, "/logits")

    def _small(self, ds: h5py.Dataset, where: str) -> np.ndarray:
        """Read a small auxiliary dataset whole, after checking its storage and size."""
        self._storage(ds, where)
        check_memory(ds.size * max(ds.dtype.itemsize, 8), f"{self.name}: {where} would")
        self._verify_filtered(ds, where)
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
        if self.layout == "padded":
            return int(self._logits.shape[-1])
        return -1

    # -- storage: is what HDF5 would read really in this file?
    def _storage(self, ds: h5py.Dataset, where: str) -> tuple[int, int] | None:
        """Check that ``ds``'s data is all stored in this file; return ``(byte offset,
        bytes)`` when it is one raw run that may be read directly, else None."""
        size = self._stat.st_size
        dcpl = ds.id.get_create_plist()
        here = self._in_this_file(ds)
        if not here:
            where += f" (in {show(ds.file.filename)})"
        if dcpl.get_external_count():
            raise DumpError(f"{self.name}: {where} keeps its data in external files, which "
                            "rnntool does not read")
        layout = dcpl.get_layout()
        if layout == h5py.h5d.VIRTUAL:
            raise DumpError(f"{self.name}: {where} is a virtual dataset (data in other files), "
                            "which rnntool does not read")
        item = ds.dtype.itemsize
        nbytes = int(np.prod(ds.shape, dtype=np.float64)) * item
        if nbytes == 0 or layout == h5py.h5d.COMPACT:
            return None
        # Raw reads only of the standard little-endian IEEE types: HDF5 converts any
        # other float layout (h5py may still call it float32) on reading.
        raw = here and not dcpl.get_nfilters() and any(
            ds.id.get_type().equal(t) for t in _RAW_TYPES)
        if layout == h5py.h5d.CONTIGUOUS:
            start = ds.id.get_offset()
            if start is None:
                raise DumpError(f"{self.name}: {where} was never written (no data stored; HDF5 "
                                "would read zeros)")
            if here and start + nbytes > size:
                raise DumpError(f"{self.name}: {where} declares {nbytes} bytes at offset {start}, "
                                f"past the end of the file ({size} bytes): truncated?")
            return (start, nbytes) if raw and start % item == 0 else None
        chunks = ds.chunks
        expected = int(np.prod([-(-n // c) for n, c in zip(ds.shape, chunks, strict=True)],
                               dtype=np.float64))
        chunk_bytes = int(np.prod(chunks, dtype=np.float64)) * item
        if chunk_bytes > max(2 * nbytes, 1 << 26):
            raise DumpError(f"{self.name}: {where} declares chunks of {chunk_bytes} bytes for "
                            f"{nbytes} bytes of data")
        info = []
        ds.id.chunk_iter(info.append)
        # Every chunk of the grid must be stored (a chunk outside the extent does not count):
        # HDF5 reads a missing one as the fill value.
        on_grid = {c.chunk_offset for c in info if all(
            o % k == 0 and o < n for o, k, n in zip(c.chunk_offset, chunks, ds.shape, strict=True))}
        if len(on_grid) < expected:
            raise DumpError(f"{self.name}: {where}: only {len(on_grid)} of its {expected} chunks "
                            "are stored (a partly written or truncated dump; HDF5 would read "
                            "zeros)")
        if here:
            end = max(c.byte_offset + c.size for c in info)
            if end > size:
                raise DumpError(f"{self.name}: {where} has chunks past the end of the file "
                                f"({end} > {size} bytes): truncated?")
        all_skipped = (1 << dcpl.get_nfilters()) - 1
        for c in info:
            if (c.filter_mask & all_skipped) == all_skipped and c.size != chunk_bytes:
                # An unfiltered chunk shorter than the chunk: HDF5 would read past its end.
                raise DumpError(f"{self.name}: {where}: a chunk at {c.chunk_offset} holds "
                                f"{c.size} bytes, not {chunk_bytes}")
        if not raw or tuple(chunks[1:]) != tuple(ds.shape[1:]):
            return None
        info.sort(key=lambda c: c.chunk_offset)
        start = info[0].byte_offset
        if start % item or any(c.byte_offset != start + k * chunk_bytes or c.filter_mask
                               for k, c in enumerate(info)):
            return None
        return start, nbytes

    def _verify_filtered(self, ds: h5py.Dataset, where: str) -> None:
        """Every chunk of a filtered (compressed) dataset must decode to a whole chunk.

        HDF5 does not check this: a chunk that decompresses short leaves the rest of
        its buffer uninitialised, and the numbers change from run to run. The size
        through deflate (zlib) and LZF is computed here from the stored bytes;
        shuffle, Fletcher-32, n-bit and scale-offset cannot change it. Any other
        filter is refused (its output cannot be checked). Once per dataset.
        """
        key = (ds.file.filename, ds.name)
        if key in self._verified:
            return
        dcpl = ds.id.get_create_plist()
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        if ds.chunks is None or not filters:
            return
        unknown = [f for f in filters if f not in _CHECKED_FILTERS]
        if unknown:
            raise DumpError(f"{self.name}: {where} uses HDF5 filter {unknown[0]}, whose output "
                            "rnntool cannot check; store it raw, with gzip or with lzf")
        chunk_bytes = int(np.prod(ds.chunks)) * ds.dtype.itemsize
        info = []
        ds.id.chunk_iter(info.append)
        for c in info:
            mask, data = ds.id.read_direct_chunk(c.chunk_offset)
            got = _decoded_size(data, filters, mask, chunk_bytes)
            if got != chunk_bytes:
                how = "does not decode" if got < 0 else f"decodes to {got} bytes, not {chunk_bytes}"
                raise DumpError(f"{self.name}: {where}: the chunk at {c.chunk_offset} {how} "
                                "(corrupt)")
        self._verified.add(key)

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
        if self.layout == "padded":
            return utt_id in self._index
        return isinstance(utt_id, str) and utt_id in self._idset

    @property
    def _idset(self) -> set[str]:
        if not hasattr(self, "_idset_cache"):
            self._idset_cache = set(self._ids)
        return self._idset_cache

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
        if self.layout == "padded":
            info = self._info_padded(utt_id)
        else:
            info = self._info_keyed(utt_id)
        if info.dtype not in _FLOAT_DTYPES:
            raise self._err(utt_id, f"logits dtype {info.dtype} is not float16/32/64")
        if info.V < 1:
            raise self._err(utt_id, "V = 0: logits need at least one entry per node")
        if self.vocab_size > 0 and self.vocab_size != info.V:
            raise self._err(utt_id, f"V = {info.V} but the dump's vocab size is {self.vocab_size}")
        if not -info.V <= self.blank < info.V:
            raise DumpError(f"{self.name}: blank = {self.blank} is outside [-V, V) for V = "
                            f"{info.V}")
        return info

    def _info_padded(self, utt_id: str) -> UttInfo:
        b = self._index[utt_id]
        x = self._logits
        T_b, U_b = int(self._t_len[b]), int(self._u_len[b])  # exact, whatever the int type
        if T_b <= 0:
            raise self._err(utt_id, f"logit_lengths[{b}] = {T_b}, an utterance needs T >= 1")
        if U_b < 0:
            raise self._err(utt_id, f"label_lengths[{b}] = {U_b} is negative")
        if T_b > x.shape[1]:
            raise self._err(utt_id, f"logit_lengths[{b}] = {T_b} exceeds the padded T = "
                            f"{x.shape[1]}")
        if U_b + 1 > x.shape[2] or U_b > self._labels.shape[1]:
            raise self._err(utt_id, f"label_lengths[{b}] = {U_b} exceeds the padded U+1 = "
                            f"{x.shape[2]} or the labels' width {self._labels.shape[1]}")
        region = None
        if self._logits_storage is not None:
            per_utt = self._logits_storage[1] // x.shape[0]
            region = (self._logits_storage[0] + b * per_utt, tuple(x.shape[1:]))
        return UttInfo(utt_id, T_b, U_b, int(x.shape[3]), _native(x.dtype), region=region)

    def _info_keyed(self, utt_id: str) -> UttInfo:
        g = self._child(self._utts, utt_id)
        if not isinstance(g, h5py.Group):
            raise self._err(utt_id, "is not a group")
        x, y = self._child(g, "logits"), self._child(g, "labels")
        for name, ds in (("logits", x), ("labels", y)):
            if ds is None:
                raise self._err(utt_id, f"missing dataset {name}")
            if not isinstance(ds, h5py.Dataset):
                raise self._err(utt_id, f"{name} is not a dataset")
        if x.ndim != 3:
            raise self._err(utt_id, f"logits must be (T, U+1, V), got shape {x.shape}")
        if y.ndim != 1:
            raise self._err(utt_id, f"labels must be (U,), got shape {y.shape}")
        T, U1, V = x.shape
        if T == 0:
            raise self._err(utt_id, "T = 0, an utterance needs T >= 1")
        if y.shape[0] != U1 - 1:
            raise self._err(utt_id, f"{y.shape[0]} labels but logits have U+1 = {U1}")
        if y.dtype.kind not in "iu":
            raise self._err(utt_id, f"labels dtype {y.dtype} is not an integer type")
        attrs = self._utt_attrs(utt_id, g)
        stored = self._storage(x, "logits")
        self._storage(y, "labels")
        check_memory(y.size * 8, f"{self.name}: utterance {show(utt_id)}: its labels would")
        self._verify_filtered(y, f"utterance {show(utt_id)}: labels")
        self._labels_read = (utt_id, np.asarray(y[()]))  # for labels(), next
        grads = self._child(g, "grads") if "grads" in g else None
        if grads is not None:
            if not isinstance(grads, h5py.Dataset) or grads.shape != x.shape:
                raise self._err(utt_id, f"grads shape {getattr(grads, 'shape', None)} != logits "
                                f"{x.shape}")
            if _native(grads.dtype) not in _FLOAT_DTYPES:
                raise self._err(utt_id, f"grads dtype {grads.dtype} is not float16/32/64")
            self._storage(grads, "grads")
        region = None if stored is None else (stored[0], (T, U1, V))
        return UttInfo(utt_id, T, U1 - 1, V, _native(x.dtype), attrs, grads is not None, region)

    def _utt_attrs(self, utt_id: str, g: h5py.Group) -> dict:
        """The attributes rnntool uses (``loss``: a real number; ``text``: a string),
        checked; any other attribute is ignored."""
        attrs = {}
        if "loss" in g.attrs:
            v = np.asarray(g.attrs["loss"])
            if v.size != 1 or v.dtype.kind not in "iuf" or v.dtype == np.bool_:
                raise self._err(utt_id, f"attribute loss = {_shown(v)} is not a "
                                "number")
            attrs["loss"] = float(v.reshape(()))
        if "text" in g.attrs:
            v = g.attrs["text"]
            if not isinstance(v, str | bytes):
                raise self._err(utt_id, f"attribute text = {_shown(v)} is not a string")
            try:
                attrs["text"] = v.decode("utf-8") if isinstance(v, bytes) else v
            except UnicodeDecodeError:
                raise self._err(utt_id, "attribute text is not UTF-8") from None
        return attrs

    def labels(self, utt_id: str, info: UttInfo | None = None) -> np.ndarray:
        """``(U,)`` int64 labels, checked against V and blank (values as stored)."""
        info = info or self.info(utt_id)
        try:
            if self.layout == "padded":
                y = np.asarray(self._labels[self._index[utt_id], : info.U])
            elif self._labels_read[0] == utt_id:
                y = self._labels_read[1]
            else:
                y = np.asarray(self._child(self._utts, utt_id)["labels"][()])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise self._err(utt_id, f"labels unreadable ({_first_line(e)})") from None
        blank = self.blank % info.V
        # Compared in the stored dtype, so that no value wraps (uint64) before it is checked.
        bad = (y < 0) | (y >= info.V) | (y == blank)
        if bad.any():
            u = int(np.argmax(bad))
            why = "equals blank" if int(y[u]) == blank else f"is outside [0, {info.V})"
            raise self._err(utt_id, f"labels[{u}] = {int(y[u])} {why}")
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
                src = self._logits if self.layout == "padded" else self._child(
                    self._utts, utt_id)["logits"]
                self._verify_filtered(src, f"utterance {show(utt_id)}: logits"
                                      if self.layout == "keyed" else "/logits")
                sel = (np.s_[self._index[utt_id], : info.T, : info.U + 1, :]
                       if self.layout == "padded" else np.s_[...])
                if out.dtype == src.dtype and out.flags.c_contiguous:
                    src.read_direct(out, sel, np.s_[where] if where != () else np.s_[...])
                else:
                    dest[...] = src[sel]
        except DumpError:
            raise
        except (OSError, ValueError, TypeError, KeyError) as e:
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
        one = np.empty((1, info.U + 1, info.V), info.dtype)
        try:
            self._pread(info, one)
        except DumpError:
            return False
        if self.layout == "padded":
            ref = self._logits[self._index[info.utt_id], :1, : info.U + 1, :]
        else:
            ref = self._child(self._utts, info.utt_id)["logits"][:1]
        return one.tobytes() == np.ascontiguousarray(ref, info.dtype).tobytes()

    def _pread(self, info: UttInfo, dest: np.ndarray) -> None:
        """Read the utterance's raw region into ``dest`` ``(T, U+1, V)`` (C-contiguous rows)."""
        start, (_, U1_s, V) = info.region
        item = info.dtype.itemsize
        frame = U1_s * V * item  # bytes per frame in the file
        row = dest.shape[1] * V * item  # bytes per frame wanted
        runs: list[list] = []  # [file offset, buffers, end offset]: consecutive frames merged
        for t in range(dest.shape[0]):
            offset = start + t * frame
            view = memoryview(dest[t]).cast("B")
            if runs and row == frame and runs[-1][2] == offset:
                runs[-1][1].append(view)
                runs[-1][2] += row
            else:
                runs.append([offset, [view], offset + row])
        for offset, views, _ in runs:
            for k in range(0, len(views), _IOV_MAX):
                chunk = views[k : k + _IOV_MAX]
                want = sum(v.nbytes for v in chunk)
                got = os.preadv(self._fd, chunk, offset)
                if got != want:  # a regular file's read is short only at its end
                    self._check_unchanged(info.utt_id)
                    raise self._err(info.utt_id, f"the file ends inside its logits ({got} of "
                                    f"{want} bytes at offset {offset})")
                offset += want

    def read(self, utt_id: str, with_grads: bool = False) -> Utterance:
        """One utterance, validated (not for finiteness: the engine reports NaN losses)."""
        info = self.info(utt_id)
        y = self.labels(utt_id, info)
        check_memory(info.nbytes * (2 if with_grads and info.has_grads else 1),
                     f"{self.name}: utterance {show(utt_id)}: its logits")
        x = np.empty((info.T, info.U + 1, info.V), info.dtype)
        self.read_logits_into(utt_id, info, x)
        grads = None
        if with_grads and info.has_grads:
            try:
                ds = self._child(self._utts, utt_id)["grads"]
                self._verify_filtered(ds, f"utterance {show(utt_id)}: grads")
                grads = np.asarray(ds[()])
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise self._err(utt_id, f"grads unreadable ({_first_line(e)})") from None
            self._check_unchanged(utt_id)
        return Utterance(info, x, y, grads)

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


_RAW_TYPES = (h5py.h5t.IEEE_F16LE, h5py.h5t.IEEE_F32LE, h5py.h5t.IEEE_F64LE)
_SIZE_KEEPING = (h5py.h5z.FILTER_SHUFFLE,)
_FULL_OUTPUT = (h5py.h5z.FILTER_NBIT, h5py.h5z.FILTER_SCALEOFFSET)  # decode to whole chunks
_CHECKED_FILTERS = (h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_LZF, h5py.h5z.FILTER_FLETCHER32,
                    *_SIZE_KEEPING, *_FULL_OUTPUT)


def _decoded_size(data: bytes, filters: list[int], mask: int, whole: int) -> int:
    """Bytes a stored chunk decodes to through the filter pipeline (applied in reverse;
    a filter whose bit is set in ``mask`` was skipped when the chunk was written)."""
    for i in reversed(range(len(filters))):
        if mask >> i & 1:
            continue
        f = filters[i]
        if f == h5py.h5z.FILTER_FLETCHER32:
            data = data[:-4]
        elif f == h5py.h5z.FILTER_DEFLATE:
            try:
                d = zlib.decompressobj()
                data = d.decompress(data, whole + 1)  # never more than a chunk and a byte
            except zlib.error:
                return -1
        elif f == h5py.h5z.FILTER_LZF:
            if any(not (mask >> j & 1) for j in range(i)) and any(
                    filters[j] not in _SIZE_KEEPING + _FULL_OUTPUT for j in range(i)):
                return -1  # something decoded after LZF would need its bytes
            return _lzf_size(data)
        elif f in _FULL_OUTPUT:
            return whole
    return len(data)


def _lzf_size(data: bytes) -> int:
    """Length of the output an LZF stream (h5py's lzf filter: no header) decodes to,
    walking its tokens without producing it; -1 if the stream is malformed."""
    n, i, end = 0, 0, len(data)
    while i < end:
        ctrl = data[i]
        i += 1
        if ctrl < 32:  # a literal run of ctrl + 1 bytes
            i += ctrl + 1
            n += ctrl + 1
        else:  # a back reference of length (ctrl >> 5) + 2, 7 meaning "one more byte"
            length = ctrl >> 5
            if length == 7:
                if i >= end:
                    return -1
                length += data[i]
                i += 1
            if i >= end or ((ctrl & 31) << 8 | data[i]) + 1 > n:
                return -1
            i += 1
            n += length + 2
    return n if i == end else -1


def _native(dtype: np.dtype) -> np.dtype:
    """A float dtype in native byte order (HDF5 converts big-endian data on reading)."""
    return dtype.newbyteorder("=") if dtype.kind == "f" else dtype


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
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            DumpReader(path, blank=blank).close()
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        import signal

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
    each group of one dtype and one V with padded logits within ``budget_bytes`` (a
    larger utterance goes alone)."""
    order = sorted(items, key=lambda it: (it[0].dtype.str, it[0].V, it[0].T * (it[0].U + 1),
                                          it[0].utt_id))
    group: list[tuple[UttInfo, np.ndarray]] = []
    T = U1 = 0
    for it in order:
        info = it[0]
        t, u1 = max(T, info.T), max(U1, info.U + 1)
        grown = (len(group) + 1) * t * u1 * info.V * info.dtype.itemsize
        if group and (grown > budget_bytes or info.dtype != group[0][0].dtype
                      or info.V != group[0][0].V):
            yield group
            group, t, u1 = [], info.T, info.U + 1
        group.append(it)
        T, U1 = t, u1
    if group:
        yield group


def padded_bytes(infos: Sequence[UttInfo]) -> int:
    T = max(i.T for i in infos)
    U1 = max(i.U for i in infos) + 1
    return len(infos) * T * U1 * infos[0].V * infos[0].dtype.itemsize


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


__all__ = ["DumpReader", "UttInfo", "Utterance", "group_by_budget", "padded_bytes",
           "available_memory", "check_memory", "show"]
