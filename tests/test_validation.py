"""Bad input: one clear error naming the utterance and the values, never a crash."""

import pytest
import torch
from helpers import random_batch

from rnntool import TransducerLoss, rnnt_loss


def batch():
    return random_batch(3, 5, 3, 6, seed=1, mixed=False)


def call(logits, labels, t_len, u_len, **kw):
    return rnnt_loss(logits, labels, t_len, u_len, **kw)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda x, y, T, U: y.__setitem__((1, 2), 6), r"utterance 1: targets\[1, 2\] = 6 is outside \[0, 6\)"),
        (lambda x, y, T, U: y.__setitem__((2, 0), -3), r"utterance 2: targets\[2, 0\] = -3"),
        (lambda x, y, T, U: y.__setitem__((0, 1), 0), r"utterance 0: targets\[0, 1\] = 0 equals blank"),
        (lambda x, y, T, U: T.__setitem__(2, 0), r"utterance 2: logit_lengths\[2\] = 0"),
        (lambda x, y, T, U: T.__setitem__(1, -1), r"utterance 1: logit_lengths\[1\] = -1 is negative"),
        (lambda x, y, T, U: U.__setitem__(0, -2), r"utterance 0: target_lengths\[0\] = -2 is negative"),
        (lambda x, y, T, U: T.__setitem__(1, 6), r"utterance 1: logit_lengths\[1\] = 6 exceeds the logits' T dim 5"),
        (lambda x, y, T, U: U.__setitem__(2, 4), r"utterance 2: target_lengths\[2\] = 4 needs U\+1 = 5"),
    ],
)
def test_bad_values(mutate, match):
    x, y, T, U = batch()
    mutate(x, y, T, U)
    with pytest.raises(ValueError, match=match):
        call(x, y, T, U)


def test_label_past_its_length_is_ignored():
    x, y, T, U = batch()
    U[1] = 1
    y[1, 1:] = 99  # padding, never read
    call(x, y, T, U)


def test_targets_shorter_than_length():
    x, y, T, U = batch()
    with pytest.raises(ValueError, match=r"target_lengths\[0\] = 3 exceeds targets' dim 2"):
        call(x, y[:, :2], T, U)


def test_batch_sizes_disagree():
    x, y, T, U = batch()
    with pytest.raises(ValueError, match="batch sizes disagree: logits has 3, targets has 2"):
        call(x, y[:2], T, U)
    with pytest.raises(ValueError, match="target_lengths has 2"):
        call(x, y, T, U[:2])


@pytest.mark.parametrize("blank", [6, -7, 100])
def test_blank_out_of_range(blank):
    x, y, T, U = batch()
    with pytest.raises(ValueError, match=rf"blank={blank} is outside \[-V, V\) for V=6"):
        call(x, y, T, U, blank=blank)


def test_blank_negative_counts_from_end():
    x, y, T, U = random_batch(2, 4, 2, 6, blank=5, seed=3)
    torch.testing.assert_close(call(x, y, T, U, blank=-1), call(x, y, T, U, blank=5))


def test_non_float_logits():
    x, y, T, U = batch()
    with pytest.raises(TypeError, match="logits must be float16, bfloat16, float32 or float64"):
        call(x.long(), y, T, U)
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        call(x.numpy(), y, T, U)


def test_float_labels_or_lengths():
    x, y, T, U = batch()
    with pytest.raises(TypeError, match="targets must have an integer dtype"):
        call(x, y.float(), T, U)
    with pytest.raises(TypeError, match="logit_lengths must have an integer dtype"):
        call(x, y, T.float(), U)


def test_wrong_number_of_dims():
    x, y, T, U = batch()
    with pytest.raises(ValueError, match=r"logits must have 4 dims \(B, T, U\+1, V\), got shape \(5, 4, 6\)"):
        call(x[0], y, T, U)
    with pytest.raises(ValueError, match="targets must have 2 dims"):
        call(x, y[0], T, U)
    with pytest.raises(ValueError, match="target_lengths must have 1 dims"):
        call(x, y, T, U[None])


def test_bad_options():
    x, y, T, U = batch()
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(x, y, T, U, reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        call(x, y, T, U, backend="gpu")
    with pytest.raises(ValueError, match="reduction must be one of"):
        TransducerLoss(reduction="batchmean")
    with pytest.raises(TypeError, match="blank must be an int"):
        call(x, y, T, U, blank=0.0)
