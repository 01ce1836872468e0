"""The HDF5 dump format and its writer (``DumpWriter``); the reader is ``reader.py``.

Two kinds of dump (root attribute ``dump_kind``, format version 2), both keyed
when ``DumpWriter`` writes them. A *full* dump stores each utterance's joint-network
outputs, V numbers per lattice node; a *lattice* dump only the three the loss,
the alignments and the gradient norms need (V = 512 float16 logits: about 80
times smaller).

Full dump, keyed layout::

    /                        attrs: format="rnntool.dump", format_version=2 (3 for
                                    TDT), dump_kind="full", blank, vocab_size (-1: not
                                    recorded), input_kind="logits"|"log_probs",
                                    optional frame_shift (seconds per logit frame),
                                    model_kind="rnnt"|"tdt" (absent: "rnnt"),
                                    durations (D,) int64 (TDT only: the duration set)
    /vocab                   optional (V,) UTF-8 token names
    /utts/<utt_id>/logits    (T, U+1, V) float16 | float32 | float64;
                             TDT: (T, U+1, V + D), the V token logits then D
                             duration logits (NeMo's joint layout)
    /utts/<utt_id>/labels    (U,) integers
    /utts/<utt_id>           optional attrs text=<str>, loss=<float>
    /utts/<utt_id>/grads     optional, same shape as logits

Lattice dump (keyed), computed from the logits by the engine's stage 1
(``Engine.lattice_terms``) with the file's blank and input_kind; every value a
natural log (nats), finite or -inf (a probability of 0), never NaN or +inf::

    /                               attrs as a full dump's, dump_kind="lattice",
                                    vocab_size = V of the logits (always recorded)
    /vocab                          optional, as above
    /utts/<utt_id>/blank_lp         (T, U+1) log P(blank | t, u)
    /utts/<utt_id>/emit_lp          (T, U)   log P(y_{u+1} | t, u)
    /utts/<utt_id>/log_p2_others    (T, U+1) log of the sum of p_v^2 over every v
                                    but the blank and y_{u+1} (at u = U: but the blank)
    /utts/<utt_id>/labels           (U,) integers
    /utts/<utt_id>                  optional attrs text=<str>, loss=<float>

The three arrays share one dtype, float32 or float64 (``LATTICE_DTYPES``): the
engine's lattice type by default (float64 for float64 logits, else float32), so
a lattice dump scores to the same bits as the full dump of the same logits.

Padded layout (full kind, read only), as a training loop dumps a batch: root
datasets ``logits (B, T, U+1, V)``, ``labels (B, Umax)``, ``logit_lengths (B,)``,
``label_lengths (B,)``, optional ``utt_ids (B,)``; ids default to the batch index.

A TDT dump (``model_kind="tdt"``) counts V in tokens (``vocab_size``, ``/vocab``,
``blank``); its padded layout's logits are ``(B, T, U+1, V + D)``. A TDT lattice
dump (``TDT_LATTICE_DATASETS``) stores, computed by the TDT engine's stage 1
(``tdt_lattice.TDTEngine.forward``, sigma 0) with the file's blank, durations and
input_kind::

    /utts/<utt_id>/blank_lp         (T, U+1)    log P(blank | t, u)
    /utts/<utt_id>/emit_lp          (T, U)      log P(y_{u+1} | t, u)
    /utts/<utt_id>/dur_lp           (T, U+1, D) log Q(durations[i] | t, u): each row
                                                a distribution over the D durations
    /utts/<utt_id>/labels           (U,) integers

and no ``log_p2_others`` (``align --grad-norms`` and plot's gradient-norm panel
need a full TDT dump).

Format version 1 (no ``dump_kind``: full) is still read. ``rnntool/reader.py``
reads every kind and layout without loading a whole file, one utterance's slice
at a time, straight into the padded batch buffer the engine consumes;
``rnntool/compact.py`` turns a full dump into a lattice dump. Also here: the
log-prob normalisation check ``inspect`` runs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np

from . import cleanup
from .checks import bad_label, check_blank, lengths_fit
from .files import OutputError, finish_temp, resolve_target

FORMAT = "rnntool.dump"
# 1: full dumps only (no dump_kind attribute); 2: the root attribute dump_kind names
# the kind, "full" or "lattice"; 3: TDT dumps (model_kind "tdt", durations). Every
# version up to FORMAT_VERSION is read. RNN-T dumps are still written as 2, so an
# rnntool that predates TDT reads them; it refuses a TDT dump (version 3) instead of
# reading its V + D logits as V + D tokens.
FORMAT_VERSION = 3
RNNT_FORMAT_VERSION = 2
INPUT_KINDS = ("logits", "log_probs")
DUMP_KINDS = ("full", "lattice")
# The transducer the logits come from (root attribute model_kind; absent: "rnnt"):
# "rnnt" (V token logits per node) or "tdt" (Token-and-Duration Transducer: V token
# logits then one per entry of the root attribute durations, NeMo's joint layout).
MODEL_KINDS = ("rnnt", "tdt")
# A lattice dump's per-utterance datasets, beside labels: name -> shape in (T, U).
LATTICE_DATASETS = {
    "blank_lp": lambda T, U: (T, U + 1),  # log P(blank | t, u)
    "emit_lp": lambda T, U: (T, U),  # log P(y_{u+1} | t, u)
    "log_p2_others": lambda T, U: (T, U + 1),  # log sum of p_v^2 over v not blank, y_{u+1}
}
# A TDT lattice dump's (model_kind "tdt"): name -> shape in (T, U, D), D durations.
TDT_LATTICE_DATASETS = {
    "blank_lp": lambda T, U, D: (T, U + 1),  # log P(blank | t, u)
    "emit_lp": lambda T, U, D: (T, U),  # log P(y_{u+1} | t, u)
    "dur_lp": lambda T, U, D: (T, U + 1, D),  # log Q(durations[i] | t, u)
}


def lattice_shapes(model_kind: str, T: int, U: int, D: int = 0) -> dict[str, tuple]:
    """``{name: shape}`` of one utterance's lattice arrays in a lattice dump of
    ``model_kind`` ("rnnt": ``LATTICE_DATASETS``; "tdt": ``TDT_LATTICE_DATASETS``, with
    ``D`` durations), in the order they are written."""
    if model_kind == "tdt":
        return {name: f(T, U, D) for name, f in TDT_LATTICE_DATASETS.items()}
    return {name: f(T, U) for name, f in LATTICE_DATASETS.items()}

LATTICE_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_CHUNK_BYTES = 1 << 20  # target size of one HDF5 chunk (chunks run along T)
_BACKENDS = ("auto", "cpu", "cuda")  # DumpWriter(kind="lattice", backend=...)


class DumpError(Exception):
    """Bad input in a dump: the message is one line naming the file and utterance."""


def check_frame_shift(value, what: str = "frame_shift") -> float:
    """``value`` as a frame shift: seconds per logit frame, a finite real number > 0
    (a Python, numpy or 0-d array/tensor scalar; ``bool`` is not a number here).

    Raises TypeError for something that is not a real number, ValueError for one
    that is not finite or not above 0 (the message names ``what``).
    """
    if isinstance(value, bool | np.bool_):
        raise TypeError(f"{what} must be a number of seconds, got {value!r}")
    seconds = _number(what, value)
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {seconds!r}")
    return seconds


def check_dump_durations(value, what: str = "durations") -> tuple[int, ...]:
    """A TDT duration set as a tuple of ints, checked as ``tdt_loss`` checks its
    ``durations`` (``tdt_lattice.check_duration_values``: strictly ascending, >= 0,
    with 0 and 1), from a list, tuple, 1-D integer array or tensor. TypeError for
    something that is not integers, ValueError (naming ``what``) otherwise."""
    from .tdt_lattice import check_duration_values

    if isinstance(value, str | bytes) or not (isinstance(value, list | tuple)
                                              or hasattr(value, "shape")):
        raise TypeError(f"{what} must be a list or tuple of integers (e.g. [0, 1, 2, 3, 4]), "
                        f"got {type(value).__name__}")
    if not isinstance(value, list | tuple):
        a = _np(value)
        if a.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {a.shape}")
        value = list(a)
    values = tuple(_integer(f"{what}[{i}]", v) for i, v in enumerate(value))
    return check_duration_values(values)


def _np(x) -> np.ndarray:
    """numpy view of a torch tensor or array-like (bfloat16 becomes float32: HDF5 has none)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _integer(name: str, v) -> int:
    """A Python int from an int, numpy integer, or 0-d / one-element integer array or tensor."""
    a = _np(v)
    if a.size != 1 or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    return int(a.reshape(()))


def _number(name: str, v) -> float:
    """A Python float from a real number, numpy scalar, or 0-d / one-element array or tensor
    (one that requires grad, or lives on a GPU, included)."""
    a = _np(v)
    if a.size != 1 or a.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a real number, got {v!r}")
    return float(a.reshape(()))


def _lengths(name: str, v) -> np.ndarray:
    """``(B,)`` int64 lengths from any integer sequence, array or tensor."""
    if isinstance(v, list | tuple):
        return np.array([_integer(f"{name} entry", e) for e in v], np.int64)
    a = _np(v)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{name} must be a 1-D integer array, got {a.dtype} of shape "
                         f"{a.shape}")
    return a.astype(np.int64)


def _utt_id(v) -> str:
    if hasattr(v, "detach") or isinstance(v, np.ndarray):
        v = _np(v).item()
    if isinstance(v, bytes):
        v = v.decode("utf-8")
    return str(v)


def _attr_for_hdf5(utt_id: str, key: str, value):
    """Convert one per-utterance attribute to what HDF5 stores (no file access)."""
    if key == "loss":
        return _number(f"utterance {utt_id!r}: loss", value)
    if key == "text":
        if not isinstance(value, str):
            raise TypeError(f"utterance {utt_id!r}: text must be a str, got {type(value)}")
        return value
    if isinstance(value, str | bytes):
        return value
    a = _np(value)
    if a.dtype.kind not in "biufSU":
        raise TypeError(f"utterance {utt_id!r}: attribute {key}={value!r} cannot be stored")
    return a.reshape(()).item() if a.ndim == 0 else a


def _logits_dtype(x):
    """The dtype ``x``'s logits are checked as, without copying them: a numpy dtype
    (a torch bfloat16 tensor counts as float32, what it is stored as in a full dump),
    or the name of a torch dtype numpy has no match for."""
    if not hasattr(x, "detach"):
        return x.dtype
    name = str(x.dtype).removeprefix("torch.")
    if name == "bfloat16":
        return np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        return name


@dataclass
class _Pending:
    """One utterance validated and converted, not yet written: ``arrays`` maps a dataset
    name to what it holds, each chunked along T (``logits`` and maybe ``grads`` of a
    full dump; a lattice dump's ``LATTICE_DATASETS``), written in that order before
    ``labels``; ``V`` the vocabulary size of its logits."""

    utt_id: str
    arrays: dict[str, np.ndarray]
    y: np.ndarray
    attrs: dict
    V: int


# --------------------------------------------------------------------------- writer
class DumpWriteError(OSError):
    """A dump could not be written: one line naming the file (and the utterance).

    ``errno`` is the cause's (ENOSPC, EFBIG, EIO, ...) or None for a refused path.
    The writer that raised it is finished: its temporary file is gone.
    """

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _io_errno(e: BaseException) -> int | None:
    """The system errno of an I/O failure as h5py reports it, else None (a refusal by
    HDF5 itself, such as an attribute too large, is not an I/O failure)."""
    if isinstance(e, OSError) and e.errno:
        return e.errno
    if isinstance(e, OSError | RuntimeError):
        m = re.search(r"errno = (\d+)", str(e))
        if m and int(m.group(1)):
            return int(m.group(1))
    return None


def _hdf5_end(fd: int) -> int | None:
    """The end-of-file address a closed HDF5 file's superblock (at offset 0) records,
    or None when it cannot be read (then nothing is truncated)."""
    head = os.pread(fd, 64, 0)
    if len(head) < 48 or head[:8] != b"\x89HDF\r\n\x1a\n":
        return None
    version = head[8]
    if version in (0, 1):
        size, at = head[13], 24 + 4 * version
    elif version in (2, 3):
        size, at = head[9], 12
    else:
        return None
    if size not in (2, 4, 8) or at + 3 * size > len(head):
        return None
    base = int.from_bytes(head[at : at + size], "little")
    end = int.from_bytes(head[at + 2 * size : at + 3 * size], "little")
    return base + end


# Room reserved before each write (see DumpWriter._reserve): generous upper bounds on
# what HDF5 allocates, so that a full disk fails in our own posix_fallocate call and
# never inside HDF5 (HDF5 2.0 cannot recover from a failed write: objects fail to
# close, and the next call can crash the interpreter).
_RESERVE_BASE = 256 << 10  # metadata and small-data aggregator blocks, superblock
_RESERVE_PER_UTT = 32 << 10  # group, object headers, symbol-table nodes, labels
_RESERVE_PER_CHUNK = 8 << 10  # chunk-index B-tree nodes


def _chunk_rows(data: np.ndarray) -> int:
    """Rows (along T) of one HDF5 chunk of ``data`` (the layout ``_dataset`` writes)."""
    row_bytes = max(1, data[0:1].nbytes)
    return max(1, min(data.shape[0], _CHUNK_BYTES // row_bytes))


def _array_bound(data: np.ndarray) -> int:
    rows = _chunk_rows(data)
    chunk = rows * max(1, data[0:1].nbytes)
    n = -(-data.shape[0] // rows)
    # Edge chunks are stored whole; a filter may grow an incompressible chunk a little.
    return n * (chunk + chunk // 16 + _RESERVE_PER_CHUNK)


def _heap_bytes(name: str) -> int:
    """Bytes a name takes in a group's local heap (NUL-terminated, 8-aligned)."""
    return (len(name.encode("utf-8", "surrogatepass")) + 1 + 7) // 8 * 8 + 8


class DumpWriter:
    """Write a keyed dump, full or lattice. Use as a context manager; the file appears
    only on success.

    ``DumpWriter(path, blank=0, vocab=None, input_kind="logits", compression=None, *,
    kind="full", lattice_dtype=None, backend="auto", vocab_size=None,
    frame_shift=None, model_kind="rnnt", durations=None)``:

    - ``blank``: the blank index, in ``[-V, V)`` (negative counts from the end);
      ``vocab``: a sequence of V token names; ``input_kind``: ``"logits"``
      (log-softmax applied by the engine) or ``"log_probs"``; ``compression``
      ``None``, ``"lzf"`` or ``"gzip"``; ``vocab_size``: V, when known before any
      utterance (so that an empty lattice dump can record it); it and ``vocab``
      fix V, else the first utterance written does.
    - ``frame_shift``: seconds per logit frame (e.g. 0.04 for a 10 ms hop and 4x
      subsampling), stored as the root attribute ``frame_shift`` (both kinds), so
      that ``rnntool timestamps`` can give times in seconds; None stores none.
      A finite number > 0: ValueError otherwise (TypeError for a non-number).
    - ``model_kind`` (one of ``MODEL_KINDS``): ``"rnnt"``, or ``"tdt"`` for a
      Token-and-Duration Transducer's joint outputs, with ``durations`` its
      duration set (frames, e.g. ``[0, 1, 2, 3, 4]``; checked as ``tdt_loss``
      checks it). A TDT utterance's logits are ``(T, U+1, V + D)``: the V token
      logits (blank among them; ``vocab``, ``vocab_size`` and ``blank`` count
      tokens only), then one per duration; a last dim that leaves no token, or
      disagrees with the V known, is a ValueError. Stored as the root attributes
      ``model_kind`` and ``durations``. A TDT lattice dump (``kind="lattice"``)
      stores ``blank_lp (T, U+1)``, ``emit_lp (T, U)`` and ``dur_lp (T, U+1, D)``
      (``TDT_LATTICE_DATASETS``), computed by the TDT engine's forward (stage 1)
      on the logits' device.
    - ``kind`` (one of ``DUMP_KINDS``): ``"full"`` stores the logits ``(T, U+1, V)``
      as given (and gradients, if given); ``"lattice"`` takes the same logits but
      stores only ``blank_lp (T, U+1)``, ``emit_lp (T, U)`` and ``log_p2_others
      (T, U+1)`` in nats (see the module docstring), computed by the engine's
      ``lattice_terms`` on the logits' device, so that only these small arrays
      are copied to the host (never the logits).
    - ``backend`` (lattice only): ``"auto"`` runs the CUDA engine for CUDA tensors
      and the CPU engine for anything else; ``"cpu"`` or ``"cuda"`` force one
      (``"cpu"`` with CUDA tensors is a ValueError; ``"cuda"`` without a usable
      GPU, or with tensors it cannot run, raises the engine's own error; under
      Numba's simulator ``"cuda"`` runs on CPU tensors and numpy arrays).
    - ``lattice_dtype`` (lattice only): None stores the engine's lattice type,
      float64 for float64 logits and float32 otherwise, the bits a full dump of
      the same logits scores with; ``"float32"`` (or ``np.float32``) rounds
      float64 logits' arrays to float32 (their losses are then no longer
      bit-identical to the full dump's); ``"float64"`` is the same as None (an
      upper bound: float32 logits' arrays stay float32, widening adds nothing).

    The dump is written to a temporary file beside ``path`` and renamed into
    place on ``close()``, so an interrupted run leaves no half file. Raises
    ValueError/TypeError for a bad argument, ``DumpWriteError`` (an OSError) when
    the path cannot be written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        blank: int = 0,
        vocab: Sequence[str] | None = None,
        input_kind: str = "logits",
        compression: str | None = None,
        *,
        kind: str = "full",
        lattice_dtype=None,
        backend: str = "auto",
        vocab_size: int | None = None,
        frame_shift: float | None = None,
        model_kind: str = "rnnt",
        durations=None,
    ) -> None:
        if model_kind not in MODEL_KINDS:
            raise ValueError(f"model_kind must be one of {MODEL_KINDS}, got {model_kind!r}")
        if model_kind == "tdt":
            if durations is None:
                raise ValueError("model_kind='tdt' needs durations= (the duration set, e.g. "
                                 "[0, 1, 2, 3, 4])")
            durations = check_dump_durations(durations)
        elif durations is not None:
            raise ValueError("durations= is for model_kind='tdt' only")
        if frame_shift is not None:
            frame_shift = check_frame_shift(frame_shift)
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        if kind not in DUMP_KINDS:
            raise ValueError(f"kind must be one of {DUMP_KINDS}, got {kind!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if lattice_dtype is not None:
            if kind != "lattice":
                raise ValueError("lattice_dtype applies only to kind='lattice'")
            try:
                asked = np.dtype(lattice_dtype)
            except TypeError:
                asked = None
            if asked is None or asked not in LATTICE_DTYPES:
                raise ValueError("lattice_dtype must be None, 'float32' or 'float64', got "
                                 f"{lattice_dtype!r}")
            lattice_dtype = asked
        if isinstance(blank, bool):
            raise TypeError(f"blank must be an int, got {blank!r}")
        blank = _integer("blank", blank)
        self.path = os.fspath(path)
        self.blank = blank
        self.vocab = None if vocab is None else [str(t) for t in vocab]
        self.input_kind = input_kind
        self.compression = compression
        self.kind = kind
        self.lattice_dtype: np.dtype | None = lattice_dtype
        self.backend = backend
        self.frame_shift: float | None = frame_shift
        self.model_kind = model_kind
        self.durations: tuple[int, ...] | None = durations
        self.vocab_size: int | None = None if self.vocab is None else len(self.vocab)
        if vocab_size is not None:
            if isinstance(vocab_size, bool):
                raise TypeError(f"vocab_size must be an int, got {vocab_size!r}")
            vocab_size = _integer("vocab_size", vocab_size)
            if vocab_size < 1:
                raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
            if self.vocab_size is not None and self.vocab_size != vocab_size:
                raise ValueError(f"vocab_size = {vocab_size} but vocab has {self.vocab_size} "
                                 "names")
            self.vocab_size = vocab_size
        if self.vocab is not None:
            for t in self.vocab:
                try:
                    t.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(f"vocab entry {t!r} cannot be stored as UTF-8") from None
        # Not open until everything below succeeded; add()/close() check these.
        self._closed = True
        self._failed: str | None = None
        self._f = None
        self._fd = -1
        self._tmp: str | None = None
        self._heap = 0  # bytes the /utts group's name heap holds
        self._held: list = []  # h5py objects of the write in progress (see _dataset)
        self._reserved = 0  # the file size the last reservation asked for
        try:
            target = resolve_target(self.path, streams=False)
        except OutputError as e:
            raise DumpWriteError(str(e)) from None
        self._target = target
        try:
            self._fd, self._tmp = cleanup.create_temp(os.path.dirname(target.path), ".h5.part")
            self._f = h5py.File(self._tmp, "w")
            self._utts = self._f.create_group("utts")
            self._reserve(_RESERVE_BASE)
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):
                raise DumpWriteError(f"{self.path}: cannot write ({_strerror(e)})",
                                     _io_errno(e)) from None
            raise
        self._closed = False

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # ----------------------------------------------------------------- file state
    def _check_open(self) -> None:
        if self._failed is not None:
            raise ValueError(f"{self.path}: the writer was closed after an error "
                             f"({self._failed}); nothing more can be written")
        if self._closed:
            raise ValueError(f"{self.path}: the writer is closed")

    def _reserve(self, extra: int) -> None:
        """Make sure the temporary file has ``extra`` bytes allocated beyond what HDF5
        uses now (posix_fallocate), so HDF5's own writes cannot meet a full disk.
        Raises the OSError (ENOSPC, EFBIG, EDQUOT, ...) of the allocation; where the
        file system cannot preallocate at all this does nothing."""
        need = int(self._f.id.get_filesize()) + int(extra)
        self._reserved = need
        size = os.fstat(self._fd).st_size
        if need > size:
            try:
                os.posix_fallocate(self._fd, size, need - size)
            except OSError as e:
                if e.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return
                raise

    def _bound(self, items: Sequence[_Pending]) -> int:
        """An upper bound on the bytes HDF5 allocates to write ``items`` and flush."""
        total = _RESERVE_BASE
        names = 0
        for it in items:
            total += _RESERVE_PER_UTT + it.y.nbytes
            total += sum(_array_bound(a) for a in it.arrays.values())
            for value in it.attrs.values():
                total += 2 * (np.asarray(value).nbytes
                              + len(value.encode("utf-8", "surrogatepass") if isinstance(value, str)
                                    else b"")) + 1024
            names += _heap_bytes(it.utt_id)
        # The group's name heap grows by doubling: a new block of twice its size.
        return total + 2 * (self._heap + names) + 4096

    def _discard(self) -> None:
        """Drop the temporary file without writing anything more to it; never raises.

        HDF5's descriptor is pointed at /dev/null first, so closing (which flushes
        HDF5's caches) writes nothing and cannot fail on a full disk."""
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):
                if f.id.valid:
                    hfd = f.id.get_vfd_handle()
                    if isinstance(hfd, int) and hfd > 2 and hfd != self._fd:
                        null = os.open(os.devnull, os.O_RDWR)
                        try:
                            os.dup2(null, hfd)
                        finally:
                            os.close(null)
            with contextlib.suppress(Exception):
                f.close()
        self._held = []
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            cleanup.discard(self._tmp)
        self._closed = True

    def _fail(self, e: BaseException, what: str) -> DumpWriteError:
        """Finish the writer after an I/O failure; the error to raise."""
        code = _io_errno(e)
        reason = os.strerror(code) if code else _strerror(e)
        err = DumpWriteError(f"{self.path}: cannot write {what} ({reason})", code)
        self._failed = str(err)
        self._discard()
        return err

    def _dataset(self, group, name: str, data: np.ndarray) -> None:
        """Create the chunked ``group/name`` (chunks along T) holding ``data``; see _store.
        An empty array (a lattice's ``emit_lp`` of an utterance with no labels) is
        stored contiguous: HDF5 has no chunks of an empty dimension."""
        if data.size == 0:
            self._store(group, name, data)
            return
        self._store(group, name, data, chunks=(_chunk_rows(data), *data.shape[1:]),
                    compression=self.compression)

    def _store(self, group, name: str, data: np.ndarray, **kw) -> None:
        """Create ``group/name``, write ``data`` into it and flush the dataset's chunk
        cache, so an I/O failure raises here. The dataset object goes into
        ``self._held``: it must outlive a failure (closing a dataset whose cache
        cannot be written fails inside a destructor, and leaves HDF5 unusable), so
        that ``_discard`` can point HDF5 at /dev/null before anything closes it."""
        ds = group.create_dataset(name, shape=data.shape, dtype=data.dtype, **kw)
        self._held.append(ds)
        if data.size:
            ds[...] = data
        if "chunks" in kw:
            ds.id.flush()

    def _new_id(self, utt_id, taken) -> str:
        """``utt_id`` as a str, checked: not empty, no '/', not in the file or ``taken``."""
        utt_id = _utt_id(utt_id)
        if not utt_id or "/" in utt_id:
            raise ValueError(f"utterance id {utt_id!r} is empty or contains '/'")
        if utt_id in self._utts or utt_id in taken:
            raise ValueError(f"utterance {utt_id!r} was already added")
        return utt_id

    def _check_utterance(self, utt_id: str, shape: tuple, dtype, labels) -> tuple[np.ndarray, int]:
        """Validate one utterance's logits ``shape`` and ``dtype`` (``_logits_dtype``'s)
        and its labels, without reading its logits; ``(labels (U,), V)``."""
        y = _np(labels)
        if len(shape) != 3:
            raise ValueError(f"utterance {utt_id!r}: logits must be (T, U+1, V), got {shape}")
        if not (isinstance(dtype, np.dtype) and dtype in _FLOAT_DTYPES):
            raise TypeError(f"utterance {utt_id!r}: logits dtype {dtype} is not float16/32/64")
        T, U1, V = shape
        if T == 0:
            raise ValueError(f"utterance {utt_id!r}: T = 0")
        if self.durations is not None:
            V = self._tdt_tokens(utt_id, V)
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
            raise ValueError(f"utterance {utt_id!r}: labels must be a 1-D integer array")
        y = y.astype(np.int64, copy=False) if y.size == 0 else y
        if y.shape[0] != U1 - 1:
            raise ValueError(
                f"utterance {utt_id!r}: {y.shape[0]} labels but logits have U+1 = {U1}"
            )
        if self.vocab_size is not None and self.vocab_size != V:
            raise ValueError(f"utterance {utt_id!r}: V = {V}, the dump's vocab size is "
                             f"{self.vocab_size}")
        blank = check_blank(self.blank, V)
        bad = bad_label(y, V, blank)
        if bad is not None:
            raise ValueError(f"utterance {utt_id!r}: labels[{bad.index[0]}] = {bad.value} is out "
                             f"of range or blank (V={V}, blank={blank})")
        return y, int(V)

    def _tdt_tokens(self, utt_id: str, last: int) -> int:
        """V, the token count of a TDT utterance whose logits' last dim is ``last``
        (V + D); ValueError when that leaves no token or disagrees with the V known."""
        D = len(self.durations)
        V = last - D
        if V < 1 or (self.vocab_size is not None and self.vocab_size != V):
            want = ("V + D with V >= 1" if self.vocab_size is None else
                    f"V + D = {self.vocab_size} + {D} = {self.vocab_size + D}")
            raise ValueError(f"utterance {utt_id!r}: logits' last dim is {last}, but a TDT "
                             f"dump's logits are (T, U+1, V + D) with D = {D} durations "
                             f"{list(self.durations)}: it must be {want}")
        return V

    @staticmethod
    def _attrs(utt_id: str, attrs: dict) -> dict:
        """The per-utterance attributes to store (None values left out), converted."""
        return {str(key): _attr_for_hdf5(utt_id, str(key), value)
                for key, value in attrs.items() if value is not None}

    def _prepare(self, utt_id, logits, labels, grads, attrs: dict, taken) -> _Pending:
        """Validate and convert one utterance of a full dump; touches nothing in the file."""
        utt_id = self._new_id(utt_id, taken)
        x = _np(logits)
        y, V = self._check_utterance(utt_id, x.shape, x.dtype, labels)
        arrays = {"logits": x}
        if grads is not None:
            gx = _np(grads)
            if gx.shape != x.shape:
                raise ValueError(f"utterance {utt_id!r}: grads shape {gx.shape} != logits "
                                 f"shape {x.shape}")
            if gx.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"utterance {utt_id!r}: grads dtype {gx.dtype} is not "
                                "float16/32/64")
            arrays["grads"] = gx
        return _Pending(utt_id, arrays, y, self._attrs(utt_id, attrs), V)

    # ----------------------------------------------------------------- lattice kind
    def _no_grads(self, grads) -> None:
        if grads is not None:
            raise ValueError(f"{self.path}: a lattice dump stores no gradients (grads= was "
                             "given); write a full dump (kind='full') to keep them")

    @staticmethod
    def _lattice_input(logits):
        """The logits as given when a torch tensor (on its device, never copied), else
        as a numpy array."""
        return logits.detach() if hasattr(logits, "detach") else np.asarray(logits)

    def _lattice_backend(self, x) -> str:
        if self.backend != "auto":
            return self.backend
        return "cuda" if hasattr(x, "detach") and x.device.type == "cuda" else "cpu"

    def _lattice_pending(self, x, rows: Sequence[tuple], V: int) -> list[_Pending]:
        """Run the engine's stage 1 on padded logits ``x`` ``(B, T, U+1, V)`` (TDT:
        ``V + D``; validated: ``rows`` holds each utterance's ``(utt_id, labels (U,), T,
        U, attrs)``) on their device, and trim what comes back to the host into one
        ``_Pending`` each. Raises ValueError for an utterance with NaN or +inf in its
        logits."""
        if not rows:
            return []
        backend = self._lattice_backend(x)
        B = len(rows)
        targets = np.zeros((B, max(1, max(r[3] for r in rows))), np.int64)
        for b, r in enumerate(rows):
            targets[b, : r[3]] = r[1]
        t_len = np.array([r[2] for r in rows], np.int64)
        u_len = np.array([r[3] for r in rows], np.int64)
        if self.model_kind == "tdt":
            terms = self._tdt_terms(x, backend, targets, t_len, u_len, V)
        else:
            terms = self._rnnt_terms(x, backend, targets, t_len, u_len, V)
        # An upper bound: float64 keeps what the engine computed (float32 for all but
        # float64 logits: widening adds no information and the loss would lose the
        # float32 rounding that scoring the logits applies).
        dtype = np.dtype(terms["blank_lp"].dtype)
        if self.lattice_dtype is not None and self.lattice_dtype.itemsize < dtype.itemsize:
            dtype = self.lattice_dtype
        D = 0 if self.durations is None else len(self.durations)
        pending = []
        for b, (utt_id, y, T, U, attrs) in enumerate(rows):
            arrays = {}
            for name, shape in lattice_shapes(self.model_kind, T, U, D).items():
                arrays[name] = np.ascontiguousarray(
                    terms[name][(b, *(slice(0, n) for n in shape))], dtype)
            with np.errstate(all="ignore"):
                broken = any((np.isnan(a) | np.isposinf(a)).any() for a in arrays.values())
            if bool(terms["bad"][b]) or broken:
                raise ValueError(f"utterance {utt_id!r}: NaN or +inf in its logits; a lattice "
                                 "dump cannot store them (score the full logits to find where)")
            pending.append(_Pending(utt_id, arrays, y, attrs, V))
        return pending

    def _tdt_terms(self, x, backend: str, targets, t_len, u_len, V: int) -> dict:
        """A TDT lattice dump's padded arrays (numpy, on the host) and ``bad``: the TDT
        engine's forward (stage 1 on the logits' device; sigma 0) keeping ``blank_lp``,
        ``emit_lp`` ``(B, T, U+1)`` and ``dur_lp`` ``(B, T, U+1, D)``."""
        from .tdt_lattice import TDTOptions, load_tdt_engine

        engine = load_tdt_engine(backend)
        opts = TDTOptions(blank=check_blank(self.blank, V), durations=self.durations,
                          fused=self.input_kind == "logits")
        if backend == "cuda":
            import torch

            xt = x if hasattr(x, "detach") else torch.from_numpy(x)
            index = [torch.from_numpy(a).to(xt.device) for a in (targets, t_len, u_len)]
            state = engine.forward(xt, *index, opts, False)
        else:
            if hasattr(x, "detach"):
                engine.check_device(x)
            state = engine.forward(x, targets, t_len, u_len, opts, False)
        return {name: _np(getattr(state, name))
                for name in ("blank_lp", "emit_lp", "dur_lp", "bad")}

    def _rnnt_terms(self, x, backend: str, targets, t_len, u_len, V: int) -> dict:
        """An RNN-T lattice dump's padded arrays (numpy) and ``bad``:
        ``Engine.lattice_terms`` on the logits' device."""
        from .engine import LossOptions, load_engine

        engine = load_engine(backend)
        opts = LossOptions(blank=check_blank(self.blank, V), fused=self.input_kind == "logits")
        if backend == "cuda":
            import torch

            xt = x if hasattr(x, "detach") else torch.from_numpy(x)
            index = [torch.from_numpy(a).to(xt.device) for a in (targets, t_len, u_len)]
            terms = engine.lattice_terms(xt, *index, opts)
            terms = type(terms)(*(a.cpu().numpy() for a in terms))
        else:
            if hasattr(x, "detach"):
                engine.check_device(x)
            terms = engine.lattice_terms(x, targets, t_len, u_len, opts)
        return terms._asdict()

    def _write(self, items: Sequence[_Pending]) -> None:
        """Create every prepared utterance, or (on any exception) none of them.

        Room is reserved first and the file flushed after, so a full disk raises
        here: then (an I/O failure) the writer is finished -- ``DumpWriteError``
        naming the file and utterance, temporary file removed. Any other exception
        (HDF5 refusing something, KeyboardInterrupt) removes the utterances of
        this call and leaves the writer usable.
        """
        if not items:  # an empty batch: nothing to write
            return
        what = (f"utterance {items[0].utt_id!r}" if len(items) == 1 else
                f"utterance {items[0].utt_id!r} (the first of a batch of {len(items)})")
        try:
            self._reserve(self._bound(items))
        except OSError as e:
            raise self._fail(e, what) from None
        done = []
        self._held = []  # h5py objects, released only after success or _discard
        try:
            for it in items:
                what = f"utterance {it.utt_id!r}"
                g = self._utts.create_group(it.utt_id)
                self._held.append(g)
                done.append(it.utt_id)
                for name, data in it.arrays.items():
                    if self.kind == "lattice" and self.compression is None:
                        # Small arrays read whole: a chunk index would cost more than
                        # the data (2.6 KB per array, a third of a typical lattice).
                        self._store(g, name, data)
                    else:
                        self._dataset(g, name, data)
                self._store(g, "labels", it.y)
                for key, value in it.attrs.items():
                    g.attrs[key] = value
            self._f.flush()
        except BaseException as e:
            if _io_errno(e) is not None:
                raise self._fail(e, what) from None  # no rollback: HDF5 is past trusting
            self._held = []
            for u in done:
                with contextlib.suppress(Exception):
                    del self._utts[u]
            raise
        self._held = []
        self._heap += sum(_heap_bytes(it.utt_id) for it in items)
        if items and self.vocab_size is None:
            self.vocab_size = items[0].V

    def add(self, utt_id: str, logits, labels, *, grads=None, **attrs) -> None:
        """One utterance: ``logits`` ``(T, U+1, V)``, ``labels`` ``(U,)``; attrs text=, loss=.

        All or nothing: everything is validated and converted before anything is
        written, and a failed write leaves no trace of the utterance. Tensors may
        require grad and live on any device; numbers may be Python, numpy or 0-d
        array/tensor scalars. Logits are numpy arrays or torch tensors, float16,
        float32 or float64 (torch bfloat16 too: a full dump stores it as float32).

        A lattice dump (``kind="lattice"``) stores the lattice of these logits
        (see the class docstring); ``grads`` is then a ValueError, and so are NaN
        or +inf in the logits (``"utterance 'u3': NaN or +inf in its logits; a
        lattice dump cannot store them (...)"``).

        Raises ValueError/TypeError for bad input (the writer stays usable);
        ``DumpWriteError`` (an OSError: ``"{path}: cannot write utterance 'u7' (No
        space left on device)"``) when the disk is full or an I/O error occurs, after
        which the writer is finished and its temporary file removed; ValueError
        once the writer is closed (or was finished by such an error).
        """
        self._check_open()
        if self.kind == "full":
            self._write([self._prepare(utt_id, logits, labels, grads, attrs, ())])
            return
        self._no_grads(grads)
        x = self._lattice_input(logits)
        utt_id = self._new_id(utt_id, ())
        y, V = self._check_utterance(utt_id, tuple(x.shape), _logits_dtype(x), labels)
        row = (utt_id, y, int(x.shape[0]), int(x.shape[1]) - 1, self._attrs(utt_id, attrs))
        self._write(self._lattice_pending(x[None], [row], V))

    def add_batch(self, logits, labels, logit_lengths, label_lengths, utt_ids=None,
                  *, grads=None, losses=None, texts=None) -> list[str]:
        """A padded batch ``(B, T, U+1, V)``; padding is trimmed. Returns the ids written.

        ``labels`` ``(B, S)``, ``logit_lengths`` and ``label_lengths`` ``(B,)``
        integers (arrays, tensors or sequences); utterance b is ``logits[b, :T_b,
        :U_b+1]`` with labels ``labels[b, :U_b]``. ``utt_ids`` default to ``"<n>"``
        counting from the utterances already written; ``losses`` ``(B,)`` and
        ``texts`` become per-utterance attrs (an entry None: none for that
        utterance). All or nothing: the whole batch is validated (for a lattice
        dump also computed) before any utterance is written, and a failure while
        writing removes the ones already written. For a lattice dump only labels
        and lengths are copied to the host before the engine runs, and the engine
        runs once on the whole padded batch. Errors as for ``add``.
        """
        self._check_open()
        lattice = self.kind == "lattice"
        if lattice:
            self._no_grads(grads)
            x = self._lattice_input(logits)
        else:
            x = _np(logits)
        y = _np(labels)
        if x.ndim != 4:
            raise ValueError(f"logits must be (B, T, U+1, V), got {tuple(x.shape)}")
        if y.ndim != 2:
            raise ValueError(f"labels must be (B, S), got {y.shape}")
        t_len = _lengths("logit_lengths", logit_lengths)
        u_len = _lengths("label_lengths", label_lengths)
        B = int(x.shape[0])
        if utt_ids is None:
            n0 = len(self._utts)
            utt_ids = [str(n0 + b) for b in range(B)]
        else:
            utt_ids = [_utt_id(u) for u in (_np(utt_ids).tolist() if hasattr(utt_ids, "detach")
                                            else utt_ids)]
        loss_values = None
        if losses is not None:
            lv = list(losses) if isinstance(losses, list | tuple) else _np(losses)
            if len(lv) != B or (isinstance(lv, np.ndarray) and lv.ndim != 1):
                raise ValueError(f"losses must be (B,) = ({B},), got {np.shape(lv)}")
            loss_values = [None if v is None else _number("losses entry", v) for v in lv]
        if texts is not None:
            texts = list(texts)
            if len(texts) != B:
                raise ValueError(f"texts has {len(texts)} entries, the batch {B}")
        gx = None
        if grads is not None:
            gx = _np(grads)
            if gx.shape != x.shape:
                raise ValueError(f"grads shape {gx.shape} != logits shape {x.shape}")
        if not (len(utt_ids) == y.shape[0] == t_len.shape[0] == u_len.shape[0] == B):
            raise ValueError("batch sizes of logits, labels, lengths and utt_ids disagree")
        shape = tuple(int(n) for n in x.shape)
        dtype = _logits_dtype(x) if lattice else None
        pending: list[_Pending] = []
        rows: list[tuple] = []  # lattice: (utt_id, labels, T, U, attrs) for _lattice_pending
        taken: set[str] = set()
        for b in range(B):
            T_b, U_b = int(t_len[b]), int(u_len[b])
            if not lengths_fit(T_b, U_b, shape[1], shape[2], y.shape[1]):
                raise ValueError(f"utterance {utt_ids[b]!r}: lengths T={T_b}, U={U_b} do not "
                                 f"fit the padded shape {shape}")
            attrs = {"loss": None if loss_values is None else loss_values[b],
                     "text": None if texts is None else texts[b]}
            if lattice:
                utt_id = self._new_id(utt_ids[b], taken)
                y_b, V = self._check_utterance(utt_id, (T_b, U_b + 1, shape[3]), dtype,
                                               y[b, :U_b])
                rows.append((utt_id, y_b, T_b, U_b, self._attrs(utt_id, attrs)))
            else:
                it = self._prepare(utt_ids[b], x[b, :T_b, : U_b + 1], y[b, :U_b],
                                   None if gx is None else gx[b, :T_b, : U_b + 1], attrs, taken)
                utt_id = it.utt_id
                pending.append(it)
            taken.add(utt_id)
        if lattice:
            pending = self._lattice_pending(x, rows, V if rows else shape[3])
        self._write(pending)
        return [it.utt_id for it in pending]

    def close(self) -> None:
        """Write the root attributes and move the file into place.

        The file is flushed, fsynced, given the replaced file's permission bits (a
        new one: 0666 & ~umask), and renamed onto the target -- after checking once
        more that the target is absent or a regular file. Raises ``DumpWriteError``
        (``"{path}: cannot write the dump (...)"``) when that fails, after removing
        the temporary file; any exception here (KeyboardInterrupt included) leaves
        no file. Closing again does nothing; closing a writer finished by an error
        raises ValueError (the dump was not written), and so does closing a lattice
        writer that knows no V (no utterance, ``vocab`` or ``vocab_size``): a lattice
        dump must record it, so none is written.
        """
        if self._failed is not None:
            raise ValueError(f"{self.path}: not written: the writer was closed after an "
                             f"error ({self._failed})")
        if self._closed:
            return
        if self.kind == "lattice" and self.vocab_size is None:
            msg = (f"{self.path}: not written: a lattice dump must record the vocabulary size "
                   "of its logits, and no utterance, vocab or vocab_size gave it")
            self._failed = msg
            self._discard()
            raise ValueError(msg)
        f = self._f
        try:
            vocab = None
            if self.vocab is not None:
                vocab = np.array(self.vocab, dtype=h5py.string_dtype())
                self._reserve(_RESERVE_BASE + 4 * sum(_heap_bytes(t) + 32 for t in self.vocab))
            else:
                self._reserve(_RESERVE_BASE)
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = (FORMAT_VERSION if self.model_kind == "tdt"
                                         else RNNT_FORMAT_VERSION)
            f.attrs["dump_kind"] = self.kind
            f.attrs["blank"] = self.blank
            f.attrs["vocab_size"] = -1 if self.vocab_size is None else self.vocab_size
            f.attrs["input_kind"] = self.input_kind
            f.attrs["model_kind"] = self.model_kind
            if self.durations is not None:
                f.attrs["durations"] = np.array(self.durations, np.int64)
            if self.frame_shift is not None:
                f.attrs["frame_shift"] = np.float64(self.frame_shift)
            if vocab is not None:
                f.create_dataset("vocab", data=vocab)
            f.flush()
        except BaseException as e:
            if _io_errno(e) is not None:
                raise self._fail(e, "the dump") from None
            self._discard()
            raise
        try:
            self._f = None
            f.close()
            fd = self._fd
            end = _hdf5_end(fd)
            if end is not None and 0 < end < os.fstat(fd).st_size:
                os.ftruncate(fd, end)  # the room reserved but not used
            finish_temp(fd, self._tmp, self._target.path, self._target.mode, name=self.path)
        except OutputError as e:
            self._failed = str(e)
            self._discard()
            raise DumpWriteError(str(e)) from None
        except BaseException as e:
            if isinstance(e, OSError | RuntimeError):
                raise self._fail(e, "the dump") from None
            self._discard()
            raise
        cleanup.unregister(self._tmp)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far (the temporary file is removed; nothing more
        is written to it). Never raises; does nothing once closed."""
        if self._closed:
            return
        self._discard()


def _strerror(e: BaseException) -> str:
    return (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
            if str(e) else type(e).__name__)


# --------------------------------------------------------------------------- reader
# The reader lives in reader.py; these names stay importable from here.
_READER_NAMES = ("DumpReader", "UttInfo", "Utterance", "group_by_budget", "padded_bytes")


def __getattr__(name):
    if name in _READER_NAMES:
        from . import reader

        return getattr(reader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- log-prob checks
_BF16_EPS = 2.0**-7


def carried_eps(x: np.ndarray) -> float:
    """Machine epsilon of the precision ``x``'s values actually carry: its dtype's,
    or a coarser one's when every value is exact in it (log-probs computed in
    bfloat16 and stored as float32, as ``DumpWriter`` must; float32 stored as float64)."""
    x = x[np.isfinite(x)]
    with np.errstate(all="ignore"):
        if x.dtype == np.float64:
            if not np.array_equal(x.astype(np.float32).astype(np.float64), x):
                return float(np.finfo(np.float64).eps)
            x = x.astype(np.float32)
        if x.dtype == np.float32:
            if not (x.view(np.uint32) & 0xFFFF).any():
                return _BF16_EPS
            if not np.array_equal(x.astype(np.float16).astype(np.float32), x):
                return float(np.finfo(np.float32).eps)
    return float(np.finfo(np.float16).eps)


def log_prob_tolerance(eps: float, V: int) -> float:
    """How far from 0 rounding can put the logsumexp of a row of log-probs rounded
    with machine epsilon ``eps``.

    Each log-prob carries a relative error of at most eps/2, so the row's
    logsumexp moves by at most eps/2 times the row's entropy, itself at most
    ln V: allow 4 * eps * max(1, ln V), 8 times that bound (V = 512: float16
    0.024, bfloat16 0.19, float32 3.0e-6, float64 5.5e-15).
    """
    return 4 * eps * max(1.0, math.log(max(V, 1)))


def log_prob_problem(x: np.ndarray) -> str | None:
    """Whether ``(T, U+1, V)`` log-probs normalise: logsumexp over V within
    ``log_prob_tolerance(carried_eps(x), V)`` of 0 on every row; a sentence
    saying how not, or None.

    Rows holding NaN or +inf are skipped (reported as such elsewhere); a row of
    only -inf does not normalise.
    """
    eps = carried_eps(x)
    tol = log_prob_tolerance(eps, x.shape[-1])
    n_rows = n_bad = 0
    worst = 0.0
    step = max(1, (1 << 22) // max(1, x[0:1].size))  # about 32 MiB of float64 at a time
    with np.errstate(all="ignore"):
        for t0 in range(0, x.shape[0], step):
            c = x[t0 : t0 + step].astype(np.float64).reshape(-1, x.shape[-1])
            c = c[~(np.isnan(c) | np.isposinf(c)).any(axis=1)]
            m = c.max(axis=1, initial=-np.inf)
            finite = np.isfinite(m)
            lse = np.full(m.shape, -np.inf)
            lse[finite] = m[finite] + np.log(np.exp(c[finite] - m[finite, None]).sum(axis=1))
            off = np.abs(lse)
            n_rows += off.size
            bad = off > tol
            n_bad += int(bad.sum())
            worst = max(worst, float(off.max(initial=0.0)))
    if not n_bad:
        return None
    return (f"{n_bad} of {n_rows} log-prob rows do not normalise: |logsumexp| up to "
            f"{worst:.3g}, tolerance {tol:.2g} (values carry eps {eps:.3g}, V={x.shape[-1]})")
