"""Data parallelism: the process group, rank and world size, the gathers and a BatchNorm over the global batch.

With several processes (``torchrun --nproc_per_node N main.py ...``) the computation is an exact split of the
single-GPU one: every loss sees the whole global batch (features are all-gathered) and every BatchNorm normalises
with the statistics of the whole global batch, as the papers' single-GPU runs of batch 32 did.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from errors import UserInputError


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def init_distributed(args) -> torch.device:
    """Joins the process group that ``torchrun`` describes (WORLD_SIZE > 1), else nothing; returns the device.

    nccl with one GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return pick_device(args.device)
    device = pick_device(args.device)
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = torch.distributed.get_rank()
    if rank != 0:  # one voice: only rank 0 logs
        logging.getLogger().setLevel(logging.WARNING)
    return device


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
