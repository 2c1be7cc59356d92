"""Metric-learning losses and feature normalisation.

The losses are the ones of TIRG (Vo et al., CVPR 2019, arXiv 1812.07119, Sec. 3.3) that ComposeAE (Anwaar et al.,
WACV 2021, arXiv 2006.11149, Sec. 3.4) reuses as its base loss:

* ``soft_triplet``: the soft triplet loss, log(1 + exp(d(i, j) - d(i, k))) over squared Euclidean distances.
* ``batch_based_classification``: cross-entropy over the batch similarity matrix (TIRG Eq. 4).

Everything runs on the features' device and is vectorised; gradients are autograd's.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class UserInputError(Exception):
    """Bad user input (a flag, a path, a file): one clear line, turned into exit code 2 by main.py."""


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


# ----------------------------------------------------------------------------------------------------------------
# Data parallelism. With several processes the computation is an exact split of the single-GPU one: every loss
# sees the whole global batch (features are all-gathered) and every BatchNorm normalises with the statistics of the
# whole global batch, as the papers' single-GPU runs of batch 32 did.
def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on every rank -> (W * B, ...) in rank order; not differentiable. Every rank passes the same shape.

    One ``torch.distributed.all_gather_single`` into one output tensor (``all_gather_into_tensor`` where a torch
    release lacks it; torch 2.14 deprecates that name, and ``torch.distributed.nn.functional.all_gather``, with a
    FutureWarning).
    """
    _, world = distributed_world()
    x = x.contiguous()
    out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x)
    return out


class _GatherBatch(torch.autograd.Function):
    """Differentiable ``all_gather_rows``: the backward gives each rank the sum over all ranks of the gradient of
    its own rows (an all-reduce of the whole gradient, then this rank's slice: any backend, gloo included)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return all_gather_rows(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        rank, _ = distributed_world()
        grad = grad.contiguous().clone()  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows]


def gather_batch(x: torch.Tensor) -> torch.Tensor:
    """(B_local, ...) -> (B_global, ...) in rank order, differentiable; ``x`` itself in a single process.

    Every rank then computes the same global loss; the backward of the gather sums the ranks' gradients, and
    DistributedDataParallel averages them, which together give exactly the single-process gradient.
    """
    _, world = distributed_world()
    if world == 1:
        return x
    return _GatherBatch.apply(x)


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch over all processes.

    Same parameters, buffers and state-dict keys as BatchNorm1d/2d; identical to them in one process and in eval
    mode. Unlike torch.nn.SyncBatchNorm it runs on any device and backend (gloo on the CPU included): one
    differentiable all-gather of [count, mean, centred sum of squares] per layer.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, world = distributed_world()
        if not self.training or world == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in fp32 at least
        # Per-process count, mean and centred sum of squares, combined exactly (Chan et al.'s parallel variance):
        # stable where E[x^2] - E[x]^2 would cancel catastrophically.
        n_local = x.numel() // c
        mean_local = xf.mean(dims)  # (C,)
        m2_local = (xf - mean_local.view([1, c] + [1] * (x.dim() - 2))).pow(2).sum(dims)  # (C,)
        count = torch.full((1,), float(n_local), dtype=torch.float32, device=x.device)
        stats = gather_batch(torch.cat([count, mean_local, m2_local]).unsqueeze(0))  # (W, 2C + 1)
        counts, means, m2s = stats[:, :1], stats[:, 1:c + 1], stats[:, c + 1:]
        n = counts.sum()
        mean = (counts * means).sum(0) / n  # (C,)
        var = (m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)) / n  # (C,) biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(m * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - m).add_(m * (var * n / (n - 1)).to(self.running_var.dtype))
                self.num_batches_tracked.add_(1)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_to_global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replaces every BatchNorm1d/2d in ``module`` by a GlobalBatchNorm holding the same parameters and buffers."""
    if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                              module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new.to(next(iter(module.state_dict().values())).device)
    for name, child in module.named_children():
        setattr(module, name, convert_to_global_batchnorm(child))
    return module
