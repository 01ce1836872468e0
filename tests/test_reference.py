"""The oracle itself, against brute force and the public fixed case."""

import itertools
import math

import pytest
import torch
from helpers import PUBLIC_LOGITS, PUBLIC_LOSS

from rnntool.reference import reference_gradients, reference_utterance_loss


def brute_force_loss(logits: torch.Tensor, labels: list[int], blank: int) -> float:
    """-log of the sum over every alignment, enumerated explicitly."""
    T, U1, _ = logits.shape
    U = U1 - 1
    logp = torch.log_softmax(logits.double(), -1)
    total = 0.0
    # An alignment: T blanks and U labels interleaved, ending with a blank.
    for emits_before in itertools.product(range(T), repeat=U):
        if list(emits_before) != sorted(emits_before):
            continue
        lp, u = 0.0, 0
        for t in range(T):
            while u < U and emits_before[u] == t:
                lp += float(logp[t, u, labels[u]])
                u += 1
            lp += float(logp[t, u, blank])
        total += math.exp(lp)
    return -math.log(total)


def test_public_case():
    x = torch.tensor(PUBLIC_LOGITS, dtype=torch.float64)
    loss = reference_utterance_loss(x, torch.tensor([1, 2]), blank=0)
    assert abs(float(loss) - PUBLIC_LOSS) < 1e-6
    assert abs(float(loss) - brute_force_loss(x, [1, 2], 0)) < 1e-12


@pytest.mark.parametrize("T,U,V,blank", [(1, 0, 3, 0), (1, 2, 4, 3), (3, 2, 4, 1), (4, 3, 5, 2)])
def test_against_brute_force(T, U, V, blank):
    g = torch.Generator().manual_seed(T * 100 + U)
    x = torch.randn(T, U + 1, V, generator=g, dtype=torch.float64) * 3
    labels = [(blank + 1 + i) % V for i in range(U)]
    loss = reference_utterance_loss(x, torch.tensor(labels), blank=blank)
    assert abs(float(loss) - brute_force_loss(x, labels, blank)) < 1e-10


def test_gradient_is_autograd_of_value():
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, 2]])
    lens = (torch.tensor([3]), torch.tensor([2]))

    def f(z):
        return reference_utterance_loss(z[0], y[0])

    assert torch.autograd.gradcheck(f, (x,))
    _, grad = reference_gradients(x, y, *lens)
    (expected,) = torch.autograd.grad(f(x), x)
    assert torch.allclose(grad, expected)


@pytest.mark.parametrize("fused", [True, False])
def test_numpy_value_agrees_with_autograd_reference(fused):
    from rnntool.reference import reference_loss_value

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, 7, generator=g, dtype=torch.float64) * 2
    if not fused:
        x = torch.log_softmax(x, -1)
    labels = torch.tensor([3, 1, 6])
    want = float(reference_utterance_loss(x, labels, blank=0, fused_log_softmax=fused))
    got = reference_loss_value(x.numpy(), labels.numpy(), 0, fused)
    assert abs(got - want) < 1e-12
