"""Is what HDF5 would read for a dataset really stored in the file?

HDF5 silently reads data that was never written (no storage allocated, chunks
missing from the grid) as the fill value, reads past the end of a truncated
file, follows external storage and virtual datasets to other files, and leaves
memory uninitialised when a compressed chunk decodes short. ``StorageChecks``
refuses all of that for the datasets of one open file, with a ``DumpError``
naming the file and the dataset, and finds the ones stored as one raw run of
bytes, which ``RawRegion.read_into`` reads straight from the file with
``preadv``.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import NamedTuple

import h5py
import numpy as np

from .checks import show
from .dump import DumpError

_IOV_MAX = 1024  # buffers per preadv call (Linux's IOV_MAX)

# Raw reads only of the standard little-endian IEEE types: HDF5 converts any other
# float layout (h5py may still call it float32) on reading.
_RAW_TYPES = (h5py.h5t.IEEE_F16LE, h5py.h5t.IEEE_F32LE, h5py.h5t.IEEE_F64LE)
_SIZE_KEEPING = (h5py.h5z.FILTER_SHUFFLE,)
_FULL_OUTPUT = (h5py.h5z.FILTER_NBIT, h5py.h5z.FILTER_SCALEOFFSET)  # decode to whole chunks
_CHECKED_FILTERS = (h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_LZF, h5py.h5z.FILTER_FLETCHER32,
                    *_SIZE_KEEPING, *_FULL_OUTPUT)


class ShortRead(NamedTuple):
    """A ``preadv`` that returned fewer bytes than asked: the file ends there."""

    got: int
    want: int
    offset: int


class RawRegion(NamedTuple):
    """Where an utterance's logits lie raw in the file: frames of ``shape[1:]`` from
    byte ``offset`` on, ``shape = (T', U'+1, V)`` as stored (for the padded layout the
    utterance's whole padded slab, of which the first ``T`` frames and ``U+1`` rows
    are its own). A tuple ``(offset, shape)``, as ``UttInfo.region`` always was."""

    offset: int
    shape: tuple[int, int, int]

    def read_into(self, fd: int, dest: np.ndarray, item: int) -> ShortRead | None:
        """Read the region's first ``dest.shape[0]`` frames, each its first
        ``dest.shape[1]`` rows of ``item``-byte values, into ``dest`` ``(T, U+1, V)``
        (C-contiguous rows of the stored dtype) with ``preadv``, consecutive frames
        in one call. None when all was read, else where the file ended."""
        _, U1_s, V = self.shape
        frame = U1_s * V * item  # bytes per frame in the file
        row = dest.shape[1] * V * item  # bytes per frame wanted
        runs: list[list] = []  # [file offset, buffers, end offset]: consecutive frames merged
        for t in range(dest.shape[0]):
            offset = self.offset + t * frame
            view = memoryview(dest[t]).cast("B")
            if runs and row == frame and runs[-1][2] == offset:
                runs[-1][1].append(view)
                runs[-1][2] += row
            else:
                runs.append([offset, [view], offset + row])
        for offset, views, end in runs:
            got = preadv_all(fd, views, offset)
            if got != end - offset:
                return ShortRead(got, end - offset, offset)
        return None


def preadv_all(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill the byte ``views`` from ``offset`` on with ``preadv``, as many calls as it
    takes; returns the bytes read, fewer than asked only where the file ends.

    One call reads at most ``_IOV_MAX`` buffers and, on Linux, about 2 GiB
    (``MAX_RW_COUNT``, whatever the sizes asked): a short read of a regular file
    means "go on", not "end of file", until a call reads nothing."""
    total = k = 0
    views = list(views)
    while k < len(views):
        got = os.preadv(fd, views[k : k + _IOV_MAX], offset)
        if got == 0:  # the end of the file
            break
        total += got
        offset += got
        while got and k < len(views):  # drop what was filled, cut the one half-filled
            n = views[k].nbytes
            if got >= n:
                got -= n
                k += 1
            else:
                views[k] = views[k][got:]
                got = 0
    return total


class StorageChecks:
    """The storage checks of the datasets of one open file.

    ``name``: the file as messages show it; ``size``: its size in bytes;
    ``in_this_file(ds)``: whether a dataset lies in that file (not in one an
    external link opened: its offsets mean nothing here, and its size is not
    ``size``).
    """

    def __init__(self, name: str, size: int, in_this_file: Callable[[h5py.Dataset], bool]):
        self.name = name
        self.size = size
        self._in_this_file = in_this_file
        self._verified: set = set()  # filtered datasets whose chunks were checked

    def raw_run(self, ds: h5py.Dataset, where: str) -> tuple[int, int] | None:
        """Check that ``ds``'s data is all stored in this file; return ``(byte offset,
        bytes)`` when it is one raw run that may be read directly, else None."""
        size = self.size
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

    def verify_filtered(self, ds: h5py.Dataset, where: str) -> None:
        """Every chunk of a filtered (compressed) dataset must decode to a whole chunk.

        HDF5 does not check this: a chunk that decompresses short leaves the rest of
        its buffer uninitialised, and the numbers change from run to run. The size
        through deflate (zlib) and LZF is computed here from the stored bytes;
        shuffle, Fletcher-32, n-bit and scale-offset cannot change it. Any other
        filter is refused (its output cannot be checked). Once per dataset.
        """
        dcpl = ds.id.get_create_plist()
        if not dcpl.get_nfilters():
            return  # nothing to check (and cheaper to see than the cache below)
        key = (ds.file.filename, ds.name)
        if key in self._verified:
            return
        filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
        if ds.chunks is None:
            self._verified.add(key)  # not again for the next utterance
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
            got = decoded_size(data, filters, mask, chunk_bytes)
            if got != chunk_bytes:
                how = "does not decode" if got < 0 else f"decodes to {got} bytes, not {chunk_bytes}"
                raise DumpError(f"{self.name}: {where}: the chunk at {c.chunk_offset} {how} "
                                "(corrupt)")
        self._verified.add(key)


def decoded_size(data: bytes, filters: list[int], mask: int, whole: int) -> int:
    """Bytes a stored chunk decodes to through the filter pipeline (applied in reverse;
    a filter whose bit is set in ``mask`` was skipped when the chunk was written);
    -1 when it does not decode. ``whole``: a whole chunk's bytes (deflate never
    decodes more than one byte past it)."""
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
            return lzf_size(data)
        elif f in _FULL_OUTPUT:
            return whole
    return len(data)


def lzf_size(data: bytes) -> int:
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


def native(dtype: np.dtype) -> np.dtype:
    """A float dtype in native byte order (HDF5 converts big-endian data on reading)."""
    return dtype.newbyteorder("=") if dtype.kind == "f" else dtype


__all__ = ["RawRegion", "ShortRead", "StorageChecks", "decoded_size", "lzf_size", "native",
           "preadv_all"]
