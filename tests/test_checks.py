"""The label, blank and length rules (rnntool.checks), and that the reader and the
writer apply the same ones."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import write_keyed_raw, write_padded_raw

from rnntool.checks import (
    LENGTH_RULES,
    bad_label,
    blank_problem,
    check_blank,
    first_length_fault,
    length_faults,
    lengths_fit,
    normalise_blank,
    show,
)
from rnntool.dump import DumpError, DumpWriter
from rnntool.reader import DumpReader


# --------------------------------------------------------------------------- blank
@pytest.mark.parametrize("blank, V, index", [(0, 6, 0), (5, 6, 5), (-1, 6, 5), (-6, 6, 0),
                                             (6, 6, None), (-7, 6, None), (0, 0, None),
                                             (0, 1, 0), (-1, 1, 0)])
def test_blank_range_and_normalisation(blank, V, index):
    assert normalise_blank(blank, V) == index
    if index is None:
        text = f"blank={blank} is outside [-V, V) for V={V}"
        assert blank_problem(blank, V) == text
        with pytest.raises(ValueError) as e:
            check_blank(blank, V)
        assert str(e.value) == text
    else:
        assert blank_problem(blank, V) is None and check_blank(blank, V) == index


# --------------------------------------------------------------------------- labels
def test_bad_label_finds_the_first_in_order_and_says_why():
    assert bad_label(np.array([1, 2, 3]), 6, 0) is None
    assert bad_label(np.array([], np.int64), 6, 0) is None
    p = bad_label(np.array([1, 7, 0, -1]), 6, 0)
    assert (p.index, p.value, p.equals_blank) == ((1,), 7, False)
    assert p.message() == "labels[1] = 7 is outside [0, 6)"
    p = bad_label(np.array([1, 0, 7]), 6, 0)
    assert p.message() == "labels[1] = 0 equals blank"
    assert bad_label(np.array([1, -2]), 6, 0).message() == "labels[1] = -2 is outside [0, 6)"
    assert bad_label(np.array([4, 5]), 6, 5).message() == "labels[1] = 5 equals blank"


def test_bad_label_compares_as_stored():
    # uint64 beyond int64 and int8 must not wrap before they are compared.
    big = np.array([1, 2**64 - 3], np.uint64)
    p = bad_label(big, 6, 0)
    assert p.value == 2**64 - 3 and p.message() == "labels[1] = 18446744073709551613 is outside [0, 6)"
    assert bad_label(np.array([1, -128], np.int8), 200, 0).value == -128
    assert bad_label(np.array([1, 199], np.uint8), 200, 0) is None


def test_bad_label_in_a_batch_only_within_the_lengths():
    targets = np.array([[1, 2, -1], [3, 6, 0]])
    lengths = np.array([2, 3])
    within = np.arange(3)[None, :] < lengths[:, None]
    p = bad_label(targets, 6, 0, within=within)
    assert p.index == (1, 1)
    assert p.message("targets", show_v=True) == "targets[1, 1] = 6 is outside [0, 6) for V=6"
    targets[1, 1] = 4
    assert bad_label(targets, 6, 0, within=within).message("targets", show_v=True) == \
        "targets[1, 2] = 0 equals blank"
    targets[1, 2] = 5
    assert bad_label(targets, 6, 0, within=within) is None  # the -1 is padding


# --------------------------------------------------------------------------- lengths
@pytest.mark.parametrize("t, u, rule", [
    (5, 3, None), (1, 0, None), (5, 4, None),
    (-1, 3, "T_negative"), (0, -1, "U_negative"), (0, 3, "T_zero"), (6, 3, "T_over"),
    (5, 5, "U_over"),
])
def test_each_length_rule(t, u, rule):
    T, U1, S = 5, 5, 4  # U1 = 5 allows U <= 4 = S
    found = first_length_fault(np.array([t]), np.array([u]), T, U1, S)
    assert found == (None if rule is None else (rule, 0))
    assert lengths_fit(t, u, T, U1, S) == (rule is None)
    assert set(length_faults(t, u, T, U1, S)) == set(LENGTH_RULES)


def test_labels_width_rule_and_rule_order():
    # U + 1 fits the logits, but the labels are narrower.
    assert first_length_fault(np.array([5]), np.array([4]), 5, 6, 3) == ("U_over_labels", 0)
    # Rule by rule over the batch, as rnnt_loss reports: utterance 2's negative U comes
    # before utterance 0's zero T.
    t = np.array([0, 5, 5])
    u = np.array([1, 1, -1])
    assert first_length_fault(t, u, 5, 5, 4) == ("U_negative", 2)
    assert [k for k, v in length_faults(t, u, 5, 5, 4).items() if v.any()] == \
        ["U_negative", "T_zero"]


def test_lengths_are_compared_exactly():
    top = np.iinfo(np.int64).max
    assert first_length_fault(np.array([5]), np.array([top]), 5, 6, 2**63) == ("U_over", 0)
    assert not lengths_fit(5, 2**64 - 1, 5, 6, 10)
    assert not lengths_fit(2**64 - 1, 1, 5, 6, 10)


def test_checks_need_neither_torch_nor_h5py():
    code = ("import sys, rnntool.checks; "
            "print(sorted(m for m in ('torch', 'h5py') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_show_escapes_what_would_break_a_line():
    assert show("spk1-07") == "spk1-07"
    assert show("a\nb\x1b[31m") == "a\\nb\\x1b[31m"


# --------------------------------------------------------------------------- one rule, every entry point
X = np.zeros((3, 4, 6), np.float32)


@pytest.mark.parametrize("labels", [[1, 9, 2], [1, 2, 0], [-3, 1, 2],
                                    np.array([1, 2**64 - 3, 2], np.uint64)])
def test_reader_and_writer_refuse_the_same_label(tmp_path, labels):
    y = np.asarray(labels)
    p = bad_label(y, 6, 0)
    path = tmp_path / "k.h5"
    write_keyed_raw(path, {"u": (X, y)}, blank=0)
    with DumpReader(path) as r, pytest.raises(DumpError) as e:
        r.labels("u")
    assert str(e.value) == f"{path}: utterance u: {p.message()}"
    with DumpWriter(tmp_path / "w.h5", blank=0) as w, pytest.raises(ValueError) as e:
        w.add("u", X, y)
    assert str(e.value) == (f"utterance 'u': labels[{p.index[0]}] = {p.value} is out of range "
                            "or blank (V=6, blank=0)")


@pytest.mark.parametrize("blank", [6, -7])
def test_reader_and_writer_refuse_the_same_blank(tmp_path, blank):
    path = tmp_path / "k.h5"
    write_keyed_raw(path, {"u": (X, np.array([1, 2, 3]))}, blank=blank)
    with DumpReader(path) as r, pytest.raises(DumpError, match=r"blank = .* is outside"):
        r.info("u")
    with DumpWriter(tmp_path / "w.h5", blank=blank) as w, pytest.raises(ValueError) as e:
        w.add("u", X, [1, 2, 3])
    assert str(e.value) == blank_problem(blank, 6)


@pytest.mark.parametrize("t, u, fragment", [
    (0, 2, "logit_lengths[1] = 0, an utterance needs T >= 1"),
    (-2, 2, "logit_lengths[1] = -2, an utterance needs T >= 1"),
    (3, -1, "label_lengths[1] = -1 is negative"),
    (4, 2, "logit_lengths[1] = 4 exceeds the padded T = 3"),
    (3, 4, "label_lengths[1] = 4 exceeds the padded U+1 = 4 or the labels' width 3"),
    (3, 2**64 - 1, "label_lengths[1] = 18446744073709551615 exceeds the padded U+1 = 4 or the "
                   "labels' width 3"),
])
def test_reader_and_writer_refuse_the_same_lengths(tmp_path, t, u, fragment):
    B = 2
    logits = np.zeros((B, 3, 4, 6), np.float32)
    labels = np.ones((B, 3), np.int64)
    dtype = np.uint64 if u > 2**63 else np.int64
    t_len, u_len = np.array([3, t], np.int64), np.array([3, u], dtype)
    assert not lengths_fit(t, u, 3, 4, 3)
    path = tmp_path / "p.h5"
    write_padded_raw(path, logits, labels, t_len, u_len)
    with DumpReader(path) as r, pytest.raises(DumpError) as e:
        r.info("1")
    assert str(e.value) == f"{path}: utterance 1: {fragment}"
    if dtype is np.int64:
        with DumpWriter(tmp_path / "w.h5") as w, pytest.raises(ValueError, match="do not fit"):
            w.add_batch(logits, labels, t_len, u_len)


def test_padded_labels_are_checked_against_the_stored_rule(tmp_path):
    logits = np.zeros((2, 3, 4, 6), np.float32)
    labels = np.array([[1, 2, 3], [4, 0, 5]])
    path = tmp_path / "p.h5"
    write_padded_raw(path, logits, labels, np.array([3, 3]), np.array([3, 1]))
    with DumpReader(path) as r:
        assert r.labels("1").tolist() == [4]  # the blank is past label_lengths
    write_padded_raw(path, logits, labels, np.array([3, 3]), np.array([3, 2]))
    with DumpReader(path) as r, pytest.raises(DumpError) as e:
        r.labels("1")
    assert str(e.value).endswith(bad_label(labels[1, :2], 6, 0).message())
