"""Metric-learning losses and feature normalisation.

The losses are the ones of TIRG (Vo et al., CVPR 2019, arXiv 1812.07119, Sec. 3.3) that ComposeAE (Anwaar et al.,
WACV 2021, arXiv 2006.11149, Sec. 3.4) reuses as its base loss:

* ``soft_triplet``: the soft triplet loss, log(1 + exp(d(i, j) - d(i, k))) over squared Euclidean distances.
* ``batch_based_classification``: cross-entropy over the batch similarity matrix (TIRG Eq. 4).

Everything runs on the features' device and is vectorised; gradients are autograd's.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from errors import UserInputError


def pairwise_squared_distances(x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances ``||x_i - y_j||^2``, clamped at 0, as the original computed them.

    x: (N, D), y: (M, D) or None (then y = x). Returns (N, M).
    """
    y = x if y is None else y
    x_norm = x.pow(2).sum(1, keepdim=True)  # (N, 1)
    y_norm = y.pow(2).sum(1).unsqueeze(0)  # (1, M)
    return (x_norm + y_norm - 2.0 * x @ y.t()).clamp_min(0.0)


def sample_soft_triplets(batch_size: int, negatives_per_anchor: int = 3, *,
                         generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original's triplet sampling for a batch of ``batch_size`` (query, target) pairs.

    The features are ``cat([composed (B, D), target (B, D)])`` with labels ``[0..B-1, 0..B-1]``. Every one of the
    2B features is an anchor; its only positive is its partner (i +- B); from its 2B - 2 negatives it takes up to
    ``negatives_per_anchor`` distinct ones uniformly at random (the original shuffled all triplets of the anchor and
    kept the first three). Returns index tensors (i, j, k), each (T,) with T = 2B * min(3, 2B - 2).
    """
    n = 2 * batch_size
    labels = torch.arange(n, device=device) % batch_size  # (2B,)
    anchors = torch.arange(n, device=device)
    positives = (anchors + batch_size) % n
    # random scores (drawn where the generator lives); the anchor and its positive are never drawn as negatives
    scores = torch.rand(n, n, generator=generator,
                        device=generator.device if generator is not None else labels.device).to(labels.device)
    scores = scores.masked_fill(labels.unsqueeze(1) == labels.unsqueeze(0), float("inf"))  # no host sync
    m = min(negatives_per_anchor, n - 2)
    negatives = scores.argsort(dim=1)[:, :m]  # (2B, m) distinct, uniformly random subset
    i = anchors[:, None].expand(n, m).reshape(-1)  # = repeat_interleave(m), which may sync with the host
    j = positives[:, None].expand(n, m).reshape(-1)
    k = negatives.reshape(-1)
    return i, j, k


def soft_triplet_loss(features: torch.Tensor, triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                      grad_scale: float = 0.5) -> torch.Tensor:
    """Mean over triplets of ``log(1 + exp(d(i, j) - d(i, k)))`` with squared Euclidean distances d.

    features: (N, D). ``grad_scale`` scales the gradient and leaves the value alone. The original's hand-written
    numpy backward dropped the factor 2 of d/dx ||x - y||^2, so its gradient was exactly 0.5 x the true one: the
    default 0.5 reproduces the original's training; 1.0 gives the true gradient of the loss.
    """
    i, j, k = triplets
    dist = pairwise_squared_distances(features)  # (N, N)
    loss = F.softplus(dist[i, j] - dist[i, k]).mean()  # softplus(x) = log(1 + exp(x)), overflow-safe
    if grad_scale != 1.0:
        loss = grad_scale * loss + (1.0 - grad_scale) * loss.detach()
    return loss


def batch_based_classification_loss(composed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """TIRG Eq. 4: cross-entropy of ``composed @ target^T`` (B, B) against the diagonal (each query's own target)."""
    logits = composed @ target.t()  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return F.cross_entropy(logits, labels)


def base_retrieval_loss(name: str, composed: torch.Tensor, target: torch.Tensor, *,
                        generator: torch.Generator | None = None, triplet_grad_scale: float = 0.5,
                        negatives_per_anchor: int = 3) -> torch.Tensor:
    """The loss between composed queries (B, D) and their targets (B, D), by the original's ``--loss`` name."""
    if name == "soft_triplet":
        triplets = sample_soft_triplets(composed.shape[0], negatives_per_anchor, generator=generator,
                                        device=composed.device)
        return soft_triplet_loss(torch.cat([composed, target]), triplets, grad_scale=triplet_grad_scale)
    if name == "batch_based_classification":
        return batch_based_classification_loss(composed, target)
    raise UserInputError(f"unknown --loss {name!r}: use soft_triplet or batch_based_classification")


LOSS_NAMES = ("soft_triplet", "batch_based_classification")


class NormalizationLayer(torch.nn.Module):
    """``s * x / ||x||`` row-wise with a learnable scale s (initial 4.0 in TIRG and ComposeAE)."""

    def __init__(self, normalize_scale: float = 1.0, learn_scale: bool = True):
        super().__init__()
        if learn_scale:
            self.norm_s = torch.nn.Parameter(torch.tensor([float(normalize_scale)]))
        else:
            self.norm_s = float(normalize_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D) -> (B, D)
        return self.norm_s * x / x.norm(dim=1, keepdim=True)


@contextlib.contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Full fp32 matmuls (no TF32 or bf16 reduced precision), whatever the caller enabled for training, as the
    evaluation ranks; the previous precision is restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
