"""``--cuda_graph``: the training step captured once as a CUDA graph and replayed, and the choice of the training
step (``make_train_step``)."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

import sgd_step
from sgd_step import images_to_device, loss_backward_update


class CudaGraphStep:
    """``--cuda_graph``: ``sgd_step.train_one_step`` with forward, backward and the SGD update captured once as a
    CUDA graph and replayed for every batch of the same shape (opt-in, not the original).

    At batch 32 a ComposeAE step is ~1,000 small kernels whose launches bound its speed; a replay launches them all
    at once. How it keeps the step the same computation:

    * the first ``warmup`` steps run eagerly (on a side stream, as PyTorch requires before capture), which also
      creates SGD's momentum buffers;
    * the frozen BERT's vectors are looked up outside the graph and copied, with the images, into static input
      buffers (a trainable LSTM has per-batch sequence lengths and cannot be captured: main.py refuses that);
    * SGD's learning rates are constants inside the graph, so the step is captured again whenever the schedule
      changes them (every --learning_rate_decay_frequency iterations);
    * dropout and the soft-triplet sampler draw from generators registered with the graph, so every replay draws
      fresh numbers; a batch of another shape (one whose unreadable images were dropped) runs eagerly.

    On the CPU there is no capture: ``replay`` runs the same static-buffer step eagerly. Tests use that to check
    the plumbing against ``train_one_step``; on a GPU, tests/test_fast_paths.py and benchmark.py compare the
    captured step with the eager one.
    """

    def __init__(self, warmup: int = 3):
        if warmup < 1:  # SGD creates its momentum buffers on its first step: inside a capture they would be reset
            raise ValueError(f"CudaGraphStep needs at least 1 eager warm-up step, got {warmup}")
        self.warmup = warmup
        self.steps = 0
        self.static: dict[str, torch.Tensor] | None = None  # src, text, tgt input buffers
        self.outputs: dict[str, torch.Tensor] | None = None  # the loss terms, refreshed by each replay
        self.replay = None
        self.captured_lrs: tuple[float, ...] | None = None
        self.captures = 0  # how many times the step was (re)captured

    def __call__(self, model, batch: dict, optimizer, scheduler, args, device: torch.device) -> dict[str, torch.Tensor]:
        """One step, as ``sgd_step.train_one_step`` takes it: eager, or a replay of the captured graph."""
        src, tgt = images_to_device(batch, args, device)
        text = model.extract_text_feature(batch["text"])  # (B, T) from the frozen encoder's cache, outside the graph
        inputs = {"src": src, "text": text, "tgt": tgt}
        same_shape = self.static is not None and all(
            inputs[k].shape == self.static[k].shape and inputs[k].stride() == self.static[k].stride() for k in inputs)
        # the static shape is taken from a full batch only: one that lost unreadable images runs eagerly
        full = len(batch["text"]) == args.batch_size
        if self.steps < self.warmup or not full or (self.static is not None and not same_shape):
            optimizer.zero_grad(set_to_none=True)
            with _side_stream(device):
                out = loss_backward_update(model, src, text, tgt, optimizer, args, device)
        else:
            if self.static is None:
                self.static = {k: torch.empty_like(v) for k, v in inputs.items()}
            for k, v in inputs.items():
                self.static[k].copy_(v, non_blocking=True)
            lrs = tuple(group["lr"] for group in optimizer.param_groups)
            if self.replay is None or lrs != self.captured_lrs:
                self._capture(model, optimizer, args, device)
                self.captured_lrs = lrs
            self.replay()
            out = {name: value.clone() for name, value in self.outputs.items()}  # the next replay overwrites them
        self.steps += 1
        scheduler.step()
        return out

    def _capture(self, model, optimizer, args, device: torch.device) -> None:
        s = self.static

        def step() -> dict[str, torch.Tensor]:
            return loss_backward_update(model, s["src"], s["text"], s["tgt"], optimizer, args, device)

        self.replay, self.outputs = None, None  # frees the previous graph and its memory before the new capture
        optimizer.zero_grad(set_to_none=True)  # the captured backward then writes (not adds) fresh gradients
        self.captures += 1
        if device.type != "cuda":
            def replay() -> None:  # as a replay of the captured backward: gradients written afresh, not added
                optimizer.zero_grad(set_to_none=True)
                self.outputs = step()
            self.replay = replay
            return
        graph = torch.cuda.CUDAGraph()
        for module in model.modules():  # the soft-triplet sampler's own generator, besides the default one
            generator = getattr(module, "loss_generator", None)
            if generator is not None and generator.device.type == "cuda":
                graph.register_generator_state(generator)
        torch.cuda.synchronize(device)
        # thread_local: the DataLoader's pin-memory thread keeps calling CUDA during the capture, which the
        # default "global" mode would count as an error in the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.outputs = step()
        self.replay = graph.replay


@contextlib.contextmanager
def _side_stream(device: torch.device):
    """Runs the block's CUDA work on a side stream ordered after the current one (before CUDA graph capture,
    PyTorch requires the warm-up steps on a side stream); a no-op on the CPU."""
    if device.type != "cuda":
        yield
        return
    current, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        yield
    current.wait_stream(side)


def make_train_step(args) -> Callable[..., dict[str, torch.Tensor]]:
    """The training step function: ``sgd_step.train_one_step`` (looked up when called, so that tests can replace
    it), or a ``CudaGraphStep`` with --cuda_graph."""
    return CudaGraphStep() if args.cuda_graph else sgd_step.train_one_step
