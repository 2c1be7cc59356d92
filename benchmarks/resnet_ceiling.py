"""``--ceiling``: the images/s of a bare ResNet-18 training step on this machine, the bound that the model's
training step (two ResNet passes per sample and more) can approach."""
from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch
import torchvision

import distributed
from benchmarks.common import RESNET18_CEILING_IMAGES_PER_S, sync


def resnet18_ceiling(device: torch.device, batch_sizes: Sequence[int] = (32, 256), iters: int = 30, warmup: int = 10,
                     image_size: int = 224) -> dict:
    """Images/s of a bare torchvision ResNet-18 training step (bf16 autocast, channels_last, SGD with momentum) on
    random images: the issue's ceiling, measured on this machine."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    out = {}
    for bs in batch_sizes:
        x = torch.randn(bs, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (bs,), device=device)

        def step() -> None:
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(warmup):
            step()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        out[str(bs)] = bs * iters / (time.perf_counter() - t0)
    return {"ceiling_images_per_s": out, "issue_ceiling_images_per_s": {str(k): v for k, v in
                                                                      RESNET18_CEILING_IMAGES_PER_S.items()},
            "settings": {"device": str(device), "torch_version": torch.__version__, "image_size": image_size,
                         "iters": iters, "warmup": warmup,
                         "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}}


def ceiling_main(a: argparse.Namespace) -> dict:
    """--ceiling: batch 32 and 256 at 224 px, 30 timed steps after 10, unless the flags say otherwise."""
    sizes = (a.batch_size,) if a.batch_size else tuple(RESNET18_CEILING_IMAGES_PER_S)
    return resnet18_ceiling(distributed.pick_device(a.device), sizes, iters=a.iters or 30,
                            warmup=10 if a.warmup is None else a.warmup, image_size=a.image_size or 224)
