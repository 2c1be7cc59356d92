"""Losses: soft triplet value and gradient against a plain loop, sampling, batch-based classification."""
from __future__ import annotations

import math

import pytest
import torch

import torch_functions as TF
from errors import UserInputError


def loop_soft_triplet(features: torch.Tensor, triplets: list[tuple[int, int, int]]) -> torch.Tensor:
    """Plain-loop reference: mean of log(1 + exp(||xi - xj||^2 - ||xi - xk||^2))."""
    total = 0.0
    for i, j, k in triplets:
        dij = (features[i] - features[j]).pow(2).sum()
        dik = (features[i] - features[k]).pow(2).sum()
        total = total + torch.log(1 + torch.exp(dij - dik))
    return total / len(triplets)


def original_numpy_gradient(features: torch.Tensor, triplets) -> torch.Tensor:
    """The original's hand-written backward (MyTripletLossFunc.backward), re-expressed as a loop."""
    x = features.detach().double()
    d = TF.pairwise_squared_distances(x)
    g = torch.zeros_like(x)
    for i, j, k in triplets:
        f = 1.0 - 1.0 / (1.0 + math.exp(d[i, j] - d[i, k]))
        g[i] += f * (x[i] - x[j]) / len(triplets)
        g[j] += f * (x[j] - x[i]) / len(triplets)
        g[i] -= f * (x[i] - x[k]) / len(triplets)
        g[k] -= f * (x[k] - x[i]) / len(triplets)
    return g


FIXED = [(0, 3, 1), (0, 3, 2), (1, 4, 0), (2, 5, 3), (3, 0, 4), (4, 1, 5), (5, 2, 0), (5, 2, 1)]


def test_soft_triplet_value_and_gradient_match_a_plain_loop():
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    i, j, k = (torch.tensor(c) for c in zip(*FIXED))
    ours = TF.soft_triplet_loss(x, (i, j, k), grad_scale=1.0)  # the true gradient
    (g_ours,) = torch.autograd.grad(ours, x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = loop_soft_triplet(x_ref, FIXED)
    (g_ref,) = torch.autograd.grad(ref, x_ref)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(g_ours, g_ref)
    # the original's numpy backward is exactly half of the true gradient; the default grad_scale=0.5 reproduces it
    torch.testing.assert_close(g_ref * 0.5, original_numpy_gradient(x, FIXED))
    half = TF.soft_triplet_loss(x, (i, j, k))
    (g_half,) = torch.autograd.grad(half, x)
    torch.testing.assert_close(half, ours)
    torch.testing.assert_close(g_half, original_numpy_gradient(x, FIXED))


def test_soft_triplet_is_finite_for_far_apart_features():
    x = torch.tensor([[0.0], [100.0], [0.0], [100.0]], requires_grad=True)  # d_ij - d_ik = 1e4: exp overflows
    loss = TF.soft_triplet_loss(x, (torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1e4)


@pytest.mark.parametrize("batch", [2, 3, 7, 32])
def test_triplet_sampling_follows_the_original(batch):
    g = torch.Generator().manual_seed(batch)
    i, j, k = TF.sample_soft_triplets(batch, generator=g)
    n, m = 2 * batch, min(3, 2 * batch - 2)
    assert len(i) == n * m
    assert torch.equal(i, torch.arange(n).repeat_interleave(m))
    assert torch.equal(j, (i + batch) % n)  # the partner is the only positive
    labels = torch.arange(n) % batch
    assert torch.all(labels[k] != labels[i])  # never the anchor, never its positive
    for a in range(n):  # distinct negatives per anchor
        assert len(set(k[a * m:(a + 1) * m].tolist())) == m


def test_triplet_sampling_covers_all_negatives_uniformly():
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(400):
        _, _, k = TF.sample_soft_triplets(4, generator=g)
        counts += torch.bincount(k[:3], minlength=8).float()  # anchor 0 (label 0): negatives are 1,2,3,5,6,7
    assert counts[0] == 0 and counts[4] == 0
    frac = counts[[1, 2, 3, 5, 6, 7]] / 1200
    assert torch.all((frac - 3 / 6 / 3).abs() < 0.06)  # each negative drawn with probability 1/2 per anchor


def test_batch_based_classification_is_cross_entropy_on_the_diagonal():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    logits = a @ b.t()  # [[3, 1], [0, 2]]
    expected = (-(3 - math.log(math.exp(3) + math.exp(1))) - (2 - math.log(1 + math.exp(2)))) / 2
    assert TF.batch_based_classification_loss(a, b).item() == pytest.approx(expected)
    assert torch.allclose(logits, torch.tensor([[3.0, 1.0], [0.0, 2.0]]))


def test_base_loss_dispatch_and_unknown_name():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert TF.base_retrieval_loss("batch_based_classification", a, b) == TF.batch_based_classification_loss(a, b)
    assert torch.isfinite(TF.base_retrieval_loss("soft_triplet", a, b))
    with pytest.raises(UserInputError, match="unknown --loss"):
        TF.base_retrieval_loss("hinge", a, b)


def test_normalization_layer_scales_unit_rows():
    layer = TF.NormalizationLayer(4.0)
    out = layer(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(out, torch.tensor([[2.4, 3.2], [0.0, 4.0]]))
    assert layer.norm_s.requires_grad
