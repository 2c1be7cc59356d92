"""One SGD step of the original's training: forward, the weighted loss terms, backward and the update."""
from __future__ import annotations

import torch

import img_text_composition_models as models


def images_to_device(batch: dict, args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's query and target images (B, 3, H, W) on ``device`` (channels_last with --channels_last)."""
    src = batch["source_img"].to(device, non_blocking=True)
    tgt = batch["target_img"].to(device, non_blocking=True)
    if args.channels_last:
        src, tgt = src.contiguous(memory_format=torch.channels_last), tgt.contiguous(memory_format=torch.channels_last)
    return src, tgt


def loss_backward_update(model, src: torch.Tensor, texts, tgt: torch.Tensor, optimizer, args,
                         device: torch.device) -> dict[str, torch.Tensor]:
    """Forward, backward and the SGD update on gradients that the caller zeroed; returns the detached loss terms
    (the base loss under its --loss name, the extra terms, and 'total training loss'), with no host sync.

    ``texts``: B strings, or their (B, T) features from a frozen text encoder (see ``cuda_graph.CudaGraphStep``).
    """
    # Autocast's weight cache stays off: a CUDA graph cannot hold it, and with it a weight used twice (two ResNet
    # passes, the conjugate composition) would have its two gradient parts summed in bf16, without it in fp32, so
    # the eager and the captured step would differ under --amp.
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp, cache_enabled=False):
        terms = model(src, texts, tgt, args.loss)
    total = models.total_loss(terms, args.loss_weights)
    total.backward()
    optimizer.step()
    out = {name: value.detach().float() for name, value in terms.items()}
    out["total training loss"] = total.detach().float()
    return out


def train_one_step(model, batch: dict, optimizer, scheduler, args, device: torch.device) -> dict[str, torch.Tensor]:
    """One SGD step on one batch; returns the detached loss terms under the original's names (no host sync)."""
    src, tgt = images_to_device(batch, args, device)
    optimizer.zero_grad(set_to_none=True)
    out = loss_backward_update(model, src, batch["text"], tgt, optimizer, args, device)
    scheduler.step()
    return out
