"""rnntool.storage: what HDF5 would read is in the file; raw regions read with preadv."""

import os
import zlib

import h5py
import numpy as np
import pytest

from rnntool.dump import DumpError
from rnntool.reader import DumpReader
from rnntool.storage import RawRegion, ShortRead, StorageChecks, decoded_size, lzf_size


def checks_for(path) -> StorageChecks:
    return StorageChecks("f.h5", os.path.getsize(path), lambda ds: True)


def test_raw_run_of_contiguous_and_chunked_data(tmp_path):
    path = tmp_path / "f.h5"
    x = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)
    with h5py.File(path, "w") as f:
        f["contiguous"] = x
        f.create_dataset("along_t", data=x, chunks=(1, 3, 5))
        f.create_dataset("across_v", data=x, chunks=(4, 3, 1))
        f.create_dataset("gzip", data=x, chunks=(1, 3, 5), compression="gzip")
        f.create_dataset("big_endian", data=x.astype(">f4"))
    with h5py.File(path, "r") as f:
        c = checks_for(path)
        start, nbytes = c.raw_run(f["contiguous"], "contiguous")
        assert nbytes == x.nbytes and start == f["contiguous"].id.get_offset()
        assert c.raw_run(f["along_t"], "along_t")[1] == x.nbytes
        assert c.raw_run(f["across_v"], "across_v") is None  # stored, but not frame by frame
        assert c.raw_run(f["gzip"], "gzip") is None
        assert c.raw_run(f["big_endian"], "big_endian") is None  # HDF5 converts it
        c.verify_filtered(f["gzip"], "gzip")


def test_raw_run_refuses_what_hdf5_would_read_as_zeros(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("never", (4, 3, 5), np.float32)
        ds = f.create_dataset("partial", (4, 3, 5), np.float32, chunks=(1, 3, 5))
        ds[0] = 1.0
    with h5py.File(path, "r") as f:
        c = checks_for(path)
        with pytest.raises(DumpError, match=r"^f.h5: never was never written"):
            c.raw_run(f["never"], "never")
        with pytest.raises(DumpError, match=r"^f.h5: partial: only 1 of its 4 chunks are stored"):
            c.raw_run(f["partial"], "partial")
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as f:
        f["data"] = np.ones((4, 3, 5), np.float32)
    with h5py.File(path, "r") as f:
        truncated = StorageChecks("g.h5", 100, lambda ds: True)  # as if the file had 100 bytes
        with pytest.raises(DumpError, match=r"^g.h5: data declares 240 bytes at offset \d+, "
                           r"past the end of the file \(100 bytes\): truncated\?$"):
            truncated.raw_run(f["data"], "data")


def test_a_chunk_that_decodes_short_is_corrupt(tmp_path):
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("x", data=np.ones((2, 3, 5), np.float32), chunks=(1, 3, 5),
                              compression="gzip")
        ds.id.write_direct_chunk((1, 0, 0), zlib.compress(b"\0" * 20))  # 20 of 60 bytes
    with h5py.File(path, "r") as f, pytest.raises(
            DumpError, match=r"the chunk at \(1, 0, 0\) decodes to 20 bytes, not 60 \(corrupt\)"):
        checks_for(path).verify_filtered(f["x"], "x")


def test_decoded_sizes_of_real_chunks(tmp_path):
    path = tmp_path / "f.h5"
    x = np.tile(np.arange(9, dtype=np.float32), (2, 7, 1))  # compressible: the filters run
    with h5py.File(path, "w") as f:
        f.create_dataset("lzf", data=x, chunks=(1, 7, 9), compression="lzf")
        f.create_dataset("gzip", data=x, chunks=(1, 7, 9), compression="gzip", shuffle=True,
                         fletcher32=True)
    whole = 7 * 9 * 4
    with h5py.File(path, "r") as f:
        for name in ("lzf", "gzip"):
            ds = f[name]
            dcpl = ds.id.get_create_plist()
            filters = [dcpl.get_filter(i)[0] for i in range(dcpl.get_nfilters())]
            mask, data = ds.id.read_direct_chunk((0, 0, 0))
            assert mask == 0 and len(data) < whole
            assert decoded_size(data, filters, mask, whole) == whole, name
            if name == "lzf":
                assert lzf_size(data) == whole
                assert lzf_size(data[:-1]) != whole  # cut short: malformed or shorter
    assert lzf_size(b"") == 0
    assert lzf_size(b"\x02abc") == 3  # one literal run of 3 bytes
    assert lzf_size(b"\x00a\x20\x00") == 4  # "a", then 3 bytes back from distance 1
    assert lzf_size(b"\x20\x00") == -1  # a back reference before any output
    assert decoded_size(b"garbage", [h5py.h5z.FILTER_DEFLATE], 0, 60) == -1


def test_raw_region_is_the_tuple_it_was_and_reads_like_hdf5(tmp_path):
    path = tmp_path / "f.h5"
    x = np.arange(5 * 4 * 3, dtype=np.float16).reshape(5, 4, 3)
    with h5py.File(path, "w") as f:
        f["x"] = x
        offset = f["x"].id.get_offset()
    region = RawRegion(offset, (5, 4, 3))
    start, shape = region
    assert (start, shape) == (offset, (5, 4, 3)) and region == (offset, (5, 4, 3))
    fd = os.open(path, os.O_RDONLY)
    try:
        whole = np.empty_like(x)
        assert region.read_into(fd, whole, 2) is None
        np.testing.assert_array_equal(whole, x)
        part = np.empty((3, 2, 3), np.float16)  # the first 3 frames' first 2 rows
        assert region.read_into(fd, part, 2) is None
        np.testing.assert_array_equal(part, x[:3, :2])
        beyond = RawRegion(os.path.getsize(path) - 10, (5, 4, 3))
        short = beyond.read_into(fd, np.empty_like(x), 2)
        assert short == ShortRead(10, x.nbytes, os.path.getsize(path) - 10)
    finally:
        os.close(fd)


def test_reader_regions_of_both_layouts(tmp_path):
    keyed, padded = tmp_path / "k.h5", tmp_path / "p.h5"
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    with h5py.File(keyed, "w") as f:
        g = f.create_group("utts/a")
        g["logits"] = x[0]
        g["labels"] = np.array([1, 2, 3])
    with h5py.File(padded, "w") as f:
        f["logits"] = x
        f["labels"] = np.ones((2, 3), np.int64)
        f["logit_lengths"] = np.array([3, 2])
        f["label_lengths"] = np.array([3, 1])
    with DumpReader(keyed) as r:
        region = r.info("a").region
        assert isinstance(region, RawRegion) and region.shape == (3, 4, 5)
    with DumpReader(padded) as r:
        r0, r1 = r.info("0").region, r.info("1").region
        assert r0.shape == r1.shape == (3, 4, 5) and r1.offset - r0.offset == x[0].nbytes
        np.testing.assert_array_equal(r.read("1").logits, x[1, :2, :2])
