"""The HDF5 dump format: writer, streaming reader, validation.

Keyed layout (what ``DumpWriter`` writes)::

    /                        attrs: format="rnntool.dump", format_version=1, blank, vocab_size,
                                    input_kind="logits"|"log_probs"
    /vocab                   optional (V,) UTF-8 token names
    /utts/<utt_id>/logits    (T, U+1, V) float16 | float32 | float64
    /utts/<utt_id>/labels    (U,) integers
    /utts/<utt_id>           optional attrs text=<str>, loss=<float>
    /utts/<utt_id>/grads     optional, same shape as logits

Padded layout (read only), as a training loop dumps a batch: root datasets
``logits (B, T, U+1, V)``, ``labels (B, Umax)``, ``logit_lengths (B,)``,
``label_lengths (B,)``, optional ``utt_ids (B,)``; ids default to the batch index.

The reader never loads a whole file: it reads one utterance's slice at a time,
straight into the padded batch buffer the engine consumes.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import h5py
import numpy as np

from .output import umask_perms

FORMAT = "rnntool.dump"
FORMAT_VERSION = 1
INPUT_KINDS = ("logits", "log_probs")
_FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_CHUNK_BYTES = 1 << 20  # target size of one HDF5 chunk (chunks run along T)


class DumpError(Exception):
    """Bad input in a dump: the message is one line naming the file and utterance."""


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


@dataclass
class _Pending:
    """One utterance validated and converted, not yet written."""

    utt_id: str
    x: np.ndarray
    y: np.ndarray
    grads: np.ndarray | None
    attrs: dict


# --------------------------------------------------------------------------- writer
class DumpWriter:
    """Write a keyed dump. Use as a context manager; the file appears only on success.

    ``DumpWriter(path, blank=0, vocab=None, input_kind="logits", compression=None)``:
    ``vocab`` is a sequence of V token names; ``compression`` ``None``, ``"lzf"``
    or ``"gzip"``. The dump is written to a temporary file beside ``path`` and
    renamed into place on ``close()``, so an interrupted run leaves no half file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        blank: int = 0,
        vocab: Sequence[str] | None = None,
        input_kind: str = "logits",
        compression: str | None = None,
    ) -> None:
        if input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")
        if compression not in (None, "lzf", "gzip"):
            raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
        if isinstance(blank, bool):
            raise TypeError(f"blank must be an int, got {blank!r}")
        blank = _integer("blank", blank)
        self.path = os.fspath(path)
        self.blank = blank
        self.vocab = None if vocab is None else [str(t) for t in vocab]
        self.input_kind = input_kind
        self.compression = compression
        self.vocab_size: int | None = None if self.vocab is None else len(self.vocab)
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self._tmp = tempfile.mkstemp(prefix=".rnntool-", suffix=".h5.part", dir=directory)
        os.close(fd)
        self._f = h5py.File(self._tmp, "w")
        self._utts = self._f.create_group("utts")
        self._closed = False

    def __enter__(self) -> DumpWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _dataset(self, group, name: str, data: np.ndarray) -> None:
        T = data.shape[0]
        row_bytes = max(1, data[0:1].nbytes)
        chunk_t = max(1, min(T, _CHUNK_BYTES // row_bytes))
        group.create_dataset(
            name, data=data, chunks=(chunk_t, *data.shape[1:]), compression=self.compression
        )

    def _prepare(self, utt_id, logits, labels, grads, attrs: dict, vocab_size: int | None,
                 taken) -> _Pending:
        """Validate and convert one utterance; touches nothing in the file."""
        utt_id = _utt_id(utt_id)
        if not utt_id or "/" in utt_id:
            raise ValueError(f"utterance id {utt_id!r} is empty or contains '/'")
        if utt_id in self._utts or utt_id in taken:
            raise ValueError(f"utterance {utt_id!r} was already added")
        x = _np(logits)
        y = _np(labels)
        if x.ndim != 3:
            raise ValueError(f"utterance {utt_id!r}: logits must be (T, U+1, V), got {x.shape}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"utterance {utt_id!r}: logits dtype {x.dtype} is not float16/32/64")
        T, U1, V = x.shape
        if T == 0:
            raise ValueError(f"utterance {utt_id!r}: T = 0")
        if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
            raise ValueError(f"utterance {utt_id!r}: labels must be a 1-D integer array")
        y = y.astype(np.int64, copy=False) if y.size == 0 else y
        if y.shape[0] != U1 - 1:
            raise ValueError(
                f"utterance {utt_id!r}: {y.shape[0]} labels but logits have U+1 = {U1}"
            )
        if vocab_size is not None and vocab_size != V:
            raise ValueError(f"utterance {utt_id!r}: V = {V}, the dump's vocab size is "
                             f"{vocab_size}")
        if not -V <= self.blank < V:
            raise ValueError(f"blank={self.blank} is outside [-V, V) for V={V}")
        blank = self.blank % V
        bad = (y < 0) | (y >= V) | (y == blank)
        if bad.any():
            u = int(np.argmax(bad))
            raise ValueError(f"utterance {utt_id!r}: labels[{u}] = {int(y[u])} is out of range "
                             f"or blank (V={V}, blank={blank})")
        gx = None
        if grads is not None:
            gx = _np(grads)
            if gx.shape != x.shape:
                raise ValueError(f"utterance {utt_id!r}: grads shape {gx.shape} != logits "
                                 f"shape {x.shape}")
            if gx.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"utterance {utt_id!r}: grads dtype {gx.dtype} is not "
                                "float16/32/64")
        converted = {}
        for key, value in attrs.items():
            if value is not None:
                converted[str(key)] = _attr_for_hdf5(utt_id, str(key), value)
        return _Pending(utt_id, x, y, gx, converted)

    def _write(self, items: Sequence[_Pending]) -> None:
        """Create every prepared utterance, or (on any exception) none of them."""
        done = []
        try:
            for it in items:
                g = self._utts.create_group(it.utt_id)
                done.append(it.utt_id)
                self._dataset(g, "logits", it.x)
                g.create_dataset("labels", data=it.y)
                if it.grads is not None:
                    self._dataset(g, "grads", it.grads)
                for key, value in it.attrs.items():
                    g.attrs[key] = value
        except BaseException:
            for u in done:
                with contextlib.suppress(Exception):
                    del self._utts[u]
            raise
        if items and self.vocab_size is None:
            self.vocab_size = int(items[0].x.shape[2])

    def add(self, utt_id: str, logits, labels, *, grads=None, **attrs) -> None:
        """One utterance: ``logits`` ``(T, U+1, V)``, ``labels`` ``(U,)``; attrs text=, loss=.

        All or nothing: everything is validated and converted before anything is
        written, and a failed write leaves no trace of the utterance. Tensors may
        require grad and live on any device; numbers may be Python, numpy or 0-d
        array/tensor scalars.
        """
        self._write([self._prepare(utt_id, logits, labels, grads, attrs, self.vocab_size, ())])

    def add_batch(self, logits, labels, logit_lengths, label_lengths, utt_ids=None,
                  *, grads=None, losses=None, texts=None) -> list[str]:
        """A padded batch ``(B, T, U+1, V)``; padding is trimmed. Returns the ids written.

        ``utt_ids`` default to ``"<n>"`` counting from the utterances already
        written; ``losses`` ``(B,)`` and ``texts`` become per-utterance attrs.
        All or nothing: the whole batch is validated before any utterance is
        written, and a failure while writing removes the ones already written.
        """
        x = _np(logits)
        y = _np(labels)
        if x.ndim != 4:
            raise ValueError(f"logits must be (B, T, U+1, V), got {x.shape}")
        if y.ndim != 2:
            raise ValueError(f"labels must be (B, S), got {y.shape}")
        t_len = _lengths("logit_lengths", logit_lengths)
        u_len = _lengths("label_lengths", label_lengths)
        B = x.shape[0]
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
            loss_values = [_number("losses entry", v) for v in lv]
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
        pending: list[_Pending] = []
        taken: set[str] = set()
        for b in range(B):
            T_b, U_b = int(t_len[b]), int(u_len[b])
            if not (0 < T_b <= x.shape[1] and 0 <= U_b < x.shape[2] and U_b <= y.shape[1]):
                raise ValueError(f"utterance {utt_ids[b]!r}: lengths T={T_b}, U={U_b} do not "
                                 f"fit the padded shape {tuple(x.shape)}")
            attrs = {"loss": None if loss_values is None else loss_values[b],
                     "text": None if texts is None else texts[b]}
            it = self._prepare(utt_ids[b], x[b, :T_b, : U_b + 1], y[b, :U_b],
                               None if gx is None else gx[b, :T_b, : U_b + 1], attrs,
                               self.vocab_size, taken)
            taken.add(it.utt_id)
            pending.append(it)
        self._write(pending)
        return [it.utt_id for it in pending]

    def close(self) -> None:
        """Write the root attributes and move the file into place."""
        if self._closed:
            return
        f = self._f
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["blank"] = self.blank
        f.attrs["vocab_size"] = -1 if self.vocab_size is None else self.vocab_size
        f.attrs["input_kind"] = self.input_kind
        if self.vocab is not None:
            f.create_dataset("vocab", data=np.array(self.vocab, dtype=h5py.string_dtype()))
        f.close()
        umask_perms(self._tmp)
        os.replace(self._tmp, self.path)
        self._closed = True

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._closed:
            return
        self._f.close()
        os.unlink(self._tmp)
        self._closed = True


# --------------------------------------------------------------------------- reader
@dataclass
class UttInfo:
    """What is known of an utterance without reading its logits."""

    utt_id: str
    T: int
    U: int
    V: int
    dtype: np.dtype
    attrs: dict = field(default_factory=dict)
    has_grads: bool = False

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


class DumpReader:
    """Read a dump in either layout, one utterance at a time.

    ``blank`` overrides the file's. Raises ``DumpError`` (one line naming the
    file, and the utterance where there is one) for anything it cannot read.
    """

    def __init__(self, path: str | os.PathLike, blank: int | None = None) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise DumpError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise DumpError(f"{self.path}: is a directory, not an HDF5 dump")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise DumpError(f"{self.path}: not a readable HDF5 file ({_first_line(e)})") from None
        f = self._f
        try:
            if "utts" in f and isinstance(f["utts"], h5py.Group):
                self.layout = "keyed"
                self._ids = list(f["utts"].keys())
            elif all(k in f for k in ("logits", "labels", "logit_lengths", "label_lengths")):
                self.layout = "padded"
                self._init_padded()
            else:
                raise DumpError(
                    f"{self.path}: neither layout: expected group /utts (keyed) or datasets "
                    "logits, labels, logit_lengths, label_lengths (padded)"
                )
            self.input_kind = _attr_str(f.attrs.get("input_kind", "logits"))
            if self.input_kind not in INPUT_KINDS:
                raise DumpError(f"{self.path}: input_kind={self.input_kind!r} is not one of "
                                f"{', '.join(INPUT_KINDS)}")
            self.vocab = None
            if "vocab" in f:
                self.vocab = [_attr_str(t) for t in f["vocab"][()]]
            self.vocab_size = self._vocab_size()
            file_blank = int(f.attrs.get("blank", 0))
            self.blank = file_blank if blank is None else int(blank)
        except DumpError:
            f.close()
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            f.close()
            raise DumpError(f"{self.path}: unreadable ({_first_line(e)})") from None

    # -- padded layout
    def _init_padded(self) -> None:
        f = self._f
        x = f["logits"]
        if x.ndim != 4:
            raise DumpError(f"{self.path}: /logits must be (B, T, U+1, V), got {x.shape}")
        B = x.shape[0]
        self._t_len = np.asarray(f["logit_lengths"][()]).astype(np.int64).reshape(-1)
        self._u_len = np.asarray(f["label_lengths"][()]).astype(np.int64).reshape(-1)
        if f["labels"].ndim != 2:
            raise DumpError(f"{self.path}: /labels must be (B, Umax), got {f['labels'].shape}")
        sizes = (B, f["labels"].shape[0], self._t_len.shape[0], self._u_len.shape[0])
        if len(set(sizes)) != 1:
            raise DumpError(f"{self.path}: batch sizes disagree: logits {sizes[0]}, labels "
                            f"{sizes[1]}, logit_lengths {sizes[2]}, label_lengths {sizes[3]}")
        if "utt_ids" in f:
            self._ids = [_attr_str(u) for u in f["utt_ids"][()]]
            if len(self._ids) != B:
                raise DumpError(f"{self.path}: /utt_ids has {len(self._ids)} entries, B = {B}")
        else:
            self._ids = [str(b) for b in range(B)]
        self._index = {u: b for b, u in enumerate(self._ids)}

    def _vocab_size(self) -> int:
        f = self._f
        vs = int(f.attrs.get("vocab_size", -1))
        if vs > 0:
            return vs
        if self.vocab is not None:
            return len(self.vocab)
        if self.layout == "padded":
            return int(f["logits"].shape[-1])
        for u in self._ids:
            x = f["utts"][u].get("logits")
            if isinstance(x, h5py.Dataset) and x.ndim == 3:
                return int(x.shape[-1])
        return -1

    # -- common
    def __enter__(self) -> DumpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def utt_ids(self) -> list[str]:
        return list(self._ids)

    def __contains__(self, utt_id: str) -> bool:
        return utt_id in (self._index if self.layout == "padded" else self._f["utts"])

    def _err(self, utt_id: str, msg: str) -> DumpError:
        return DumpError(f"{self.path}: utterance {utt_id}: {msg}")

    def info(self, utt_id: str) -> UttInfo:
        """Shape, dtype and attrs of one utterance, checked, without reading its logits."""
        if utt_id not in self:
            raise DumpError(f"{self.path}: no utterance {utt_id!r}")
        try:
            return self._info(utt_id)
        except DumpError:
            raise
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise self._err(utt_id, f"unreadable ({_first_line(e)})") from None

    def _info(self, utt_id: str) -> UttInfo:
        f = self._f
        if self.layout == "padded":
            b = self._index[utt_id]
            x = f["logits"]
            T_b, U_b = int(self._t_len[b]), int(self._u_len[b])
            if T_b <= 0:
                raise self._err(utt_id, f"T = {T_b}, an utterance needs T >= 1")
            if U_b < 0:
                raise self._err(utt_id, f"U = {U_b} is negative")
            if T_b > x.shape[1]:
                raise self._err(utt_id, f"logit_lengths = {T_b} exceeds the padded T {x.shape[1]}")
            if U_b + 1 > x.shape[2] or U_b > f["labels"].shape[1]:
                raise self._err(utt_id, f"label_lengths = {U_b} exceeds the padded U+1 "
                                f"{x.shape[2]} or labels' width {f['labels'].shape[1]}")
            info = UttInfo(utt_id, T_b, U_b, int(x.shape[3]), x.dtype)
        else:
            g = f["utts"][utt_id]
            if not isinstance(g, h5py.Group):
                raise self._err(utt_id, "is not a group")
            for name in ("logits", "labels"):
                if name not in g:
                    raise self._err(utt_id, f"missing dataset {name}")
            x = g["logits"]
            if x.ndim != 3:
                raise self._err(utt_id, f"logits must be (T, U+1, V), got shape {x.shape}")
            y = g["labels"]
            if y.ndim != 1:
                raise self._err(utt_id, f"labels must be (U,), got shape {y.shape}")
            T, U1, V = x.shape
            if T == 0:
                raise self._err(utt_id, "T = 0, an utterance needs T >= 1")
            if y.shape[0] != U1 - 1:
                raise self._err(utt_id, f"{y.shape[0]} labels but logits have U+1 = {U1}")
            if not np.issubdtype(y.dtype, np.integer):
                raise self._err(utt_id, f"labels dtype {y.dtype} is not an integer type")
            attrs = {k: _attr_value(v) for k, v in g.attrs.items()}
            info = UttInfo(utt_id, T, U1 - 1, V, x.dtype, attrs, "grads" in g)
            if info.has_grads and g["grads"].shape != x.shape:
                raise self._err(utt_id, f"grads shape {g['grads'].shape} != logits {x.shape}")
        if info.dtype not in _FLOAT_DTYPES:
            raise self._err(utt_id, f"logits dtype {info.dtype} is not float16/32/64")
        if self.vocab_size > 0 and self.vocab_size != info.V:
            raise self._err(utt_id, f"V = {info.V} but the dump's vocab size is {self.vocab_size}")
        if not -info.V <= self.blank < info.V:
            raise DumpError(f"{self.path}: blank={self.blank} is outside [-V, V) for V={info.V}")
        return info

    def labels(self, utt_id: str, info: UttInfo | None = None) -> np.ndarray:
        """``(U,)`` int64 labels, checked against V and blank."""
        info = info or self.info(utt_id)
        if self.layout == "padded":
            y = self._f["labels"][self._index[utt_id], : info.U]
        else:
            y = self._f["utts"][utt_id]["labels"][()]
        y = np.asarray(y).astype(np.int64)
        blank = self.blank % info.V
        bad = (y < 0) | (y >= info.V) | (y == blank)
        if bad.any():
            u = int(np.argmax(bad))
            why = "equals blank" if y[u] == blank else f"is outside [0, {info.V})"
            raise self._err(utt_id, f"labels[{u}] = {int(y[u])} {why}")
        return y

    def read_logits_into(self, utt_id: str, info: UttInfo, out: np.ndarray, where=()) -> None:
        """Read ``(T, U+1, V)`` logits straight into ``out[where]``.

        ``out`` is a C-contiguous buffer, e.g. a padded batch ``(B, T, U+1, V)`` with
        ``where = np.s_[b, :T, :U+1]``; HDF5 writes the slab in place, no temporary.
        """
        try:
            if self.layout == "padded":
                src = self._f["logits"]
                sel = np.s_[self._index[utt_id], : info.T, : info.U + 1, :]
            else:
                src = self._f["utts"][utt_id]["logits"]
                sel = np.s_[:, :, :]
            dest = np.s_[where] if where != () else np.s_[...]
            if out.dtype == src.dtype and out.flags.c_contiguous:
                src.read_direct(out, sel, dest)
            else:
                out[dest] = src[sel]
        except (OSError, ValueError, TypeError) as e:
            raise self._err(utt_id, f"logits unreadable ({_first_line(e)})") from None

    def raw_region(self, info: UttInfo) -> tuple[int, tuple, np.dtype] | None:
        """``(byte offset, shape, dtype)`` of the utterance's logits stored raw in the file.

        None unless the data is stored without compression or other filter,
        little-endian, aligned, and contiguous: the keyed layout as ``DumpWriter``
        writes it (chunks along T, in order) and the padded layout as h5py
        writes it by default (then the region is this utterance's ``(T, U+1, V)``
        slab of the batch, padding included).
        """
        f = self._f
        ds = f["logits"] if self.layout == "padded" else f["utts"][info.utt_id]["logits"]
        try:
            if ds.id.get_create_plist().get_nfilters() or ds.dtype.byteorder == ">":
                return None
            item = ds.dtype.itemsize
            total = int(np.prod(ds.shape)) * item
            if ds.chunks is None:
                start = ds.id.get_offset()
            else:
                if tuple(ds.chunks[1:]) != tuple(ds.shape[1:]):  # chunked along T only
                    return None
                chunks = sorted((ds.id.get_chunk_info(i) for i in range(ds.id.get_num_chunks())),
                                key=lambda c: c.chunk_offset)
                step = int(np.prod(ds.chunks)) * item
                start = chunks[0].byte_offset if chunks else None
                if len(chunks) * ds.chunks[0] < ds.shape[0] or any(
                    c.byte_offset != start + k * step or c.filter_mask for k, c in enumerate(chunks)
                ):
                    return None
        except (OSError, ValueError, RuntimeError, AttributeError):
            return None
        if start is None or start % item or total == 0:
            return None
        shape = tuple(ds.shape)
        if self.layout == "padded":
            shape = shape[1:]
            start += self._index[info.utt_id] * (total // ds.shape[0])
        return start, shape, ds.dtype

    def map_logits(self, info: UttInfo, region=None):
        """A zero-copy, read-only ``(T, U+1, V)`` view of the logits in the file, or None.

        See ``raw_region`` for when that is possible (pass its result as ``region``
        to skip asking HDF5 again). Returns ``(array, close)``;
        call ``close()`` when done with the array: it unmaps the pages, so memory
        use stays one utterance's.
        """
        import mmap

        region = region or self.raw_region(info)
        if region is None:
            return None
        start, shape, dtype = region
        count = int(np.prod(shape))
        base = start - start % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as fh:
            mm = mmap.mmap(fh.fileno(), start - base + count * dtype.itemsize, mmap.MAP_SHARED,
                           mmap.PROT_READ, offset=base)
        arr = np.frombuffer(mm, dtype, count=count, offset=start - base).reshape(shape)

        def close() -> None:
            with contextlib.suppress(BufferError):  # a view still alive: unmapped when it dies
                mm.close()

        return arr[: info.T, : info.U + 1], close

    def read(self, utt_id: str, with_grads: bool = False) -> Utterance:
        """One utterance, validated (not for finiteness: the engine reports NaN losses)."""
        info = self.info(utt_id)
        y = self.labels(utt_id, info)
        x = np.empty((info.T, info.U + 1, info.V), info.dtype)
        self.read_logits_into(utt_id, info, x)
        grads = None
        if with_grads and info.has_grads:
            grads = self._f["utts"][utt_id]["grads"][()]
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
        return os.path.getsize(self.path)


def group_by_budget(
    items: Sequence[tuple[UttInfo, np.ndarray]], budget_bytes: int
) -> Iterator[list[tuple[UttInfo, np.ndarray]]]:
    """Group ``(info, labels)`` items for the engine: sorted by size so padding is small,
    each group of one dtype with padded logits within ``budget_bytes`` (a larger
    utterance goes alone)."""
    order = sorted(items, key=lambda it: (it[0].dtype.str, it[0].T * (it[0].U + 1), it[0].utt_id))
    group: list[tuple[UttInfo, np.ndarray]] = []
    T = U1 = 0
    for it in order:
        info = it[0]
        t, u1 = max(T, info.T), max(U1, info.U + 1)
        grown = (len(group) + 1) * t * u1 * info.V * info.dtype.itemsize
        if group and (grown > budget_bytes or info.dtype != group[0][0].dtype):
            yield group
            group, t, u1 = [], info.T, info.U + 1
        group.append(it)
        T, U1 = t, u1
    if group:
        yield group


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


def padded_bytes(infos: Sequence[UttInfo]) -> int:
    T = max(i.T for i in infos)
    U1 = max(i.U for i in infos) + 1
    return len(infos) * T * U1 * infos[0].V * infos[0].dtype.itemsize


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


def _attr_str(v) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return str(v)


def _attr_value(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    return v
