"""Train and evaluate ComposeAE / TIRG composed image retrieval models.

    python main.py                                   # embedded default: synthetic data, ComposeAE + MiniLM, CPU
    python main.py --dataset=mitstates --dataset_path=../data/mitstates/ --model=composeAE \
        --loss=batch_based_classification --learning_rate_decay_frequency=50000 --num_iters=160000 \
        --use_bert True --use_complete_text_query True --weight_decay=5e-5 --comment=mitstates_composeAE \
        --log_dir ../logs/mitstates/
    python main.py ... --test_only True --model_checkpoint RUN_DIR/latest_checkpoint.pth

The flags and their defaults are the original code's (github ecom-research/ComposeAE, main.py); the added flags
default to the original's behaviour. With ``--dataset synthetic`` (the default) the flags that are not given take
a small CPU preset instead (see ``SYNTHETIC_PRESET``).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import socket
import sys
from datetime import datetime
from typing import Sequence

import torch

import datasets
import img_text_composition_models as models
import test_retrieval
import text_model
from torch_functions import LOSS_NAMES, UserInputError, convert_to_global_batchnorm, distributed_world

logger = logging.getLogger("main")

# Original defaults of the flags that the synthetic preset changes (None in the parser means "not given").
ORIGINAL_DEFAULTS = dict(
    model="composeAE", use_bert=False, loss="soft_triplet", num_iters=160000, learning_rate_decay_frequency=9999999,
    loader_num_workers=4, log_dir="../logs/", image_size=224, image_weights="imagenet",
    bert_model="bert-base-uncased", train_eval_queries=9600, eval_every=0, save_every=0,
    use_complete_text_query=False, weight_decay=1e-6,
)
# The embedded default: a run that finishes in a few minutes on a 2-core CPU with no download.
SYNTHETIC_PRESET = dict(
    dataset_path="data/synthetic", use_bert=True, bert_model="all-MiniLM-L6-v2", loss="batch_based_classification",
    num_iters=300, learning_rate_decay_frequency=200, loader_num_workers=0, log_dir="logs", image_size=64,
    image_weights="none", train_eval_queries=500, eval_every=150, save_every=100, use_complete_text_query=False,
    weight_decay=5e-5,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def str2bool(value: str) -> bool:
    """The original's ``--use_bert True`` spelling, meaning what it says (its ``type=bool`` made 'False' True)."""
    if isinstance(value, bool):
        return value
    v = value.strip().lower()
    if v in ("true", "1", "yes", "y", "t"):
        return True
    if v in ("false", "0", "no", "n", "f"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already states it (the flags with a synthetic preset)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2 (argparse's default adds the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="main.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsFormatter)
    syn = " [synthetic: {}]"
    # -- the original's flags
    p.add_argument("-f", type=str, default="", help="ignored (lets the original run inside Jupyter)")
    p.add_argument("--comment", type=str, default="", help="suffix of the run folder name")
    p.add_argument("--dataset", type=str, default="synthetic", choices=["mitstates", "fashion200k", "fashionIQ", "synthetic"],
                   help="dataset, in its published layout under --dataset_path")
    p.add_argument("--dataset_path", type=str, default=None, help="dataset folder" + syn.format("data/synthetic"))
    p.add_argument("--model", type=str, default="composeAE", choices=list(models.MODELS), help="composition model")
    p.add_argument("--image_embed_dim", type=int, default=512, help="image embedding width")
    p.add_argument("--use_bert", type=str2bool, default=None,
                   help="frozen BERT text encoder instead of the LSTM (default: False)" + syn.format(True))
    p.add_argument("--use_complete_text_query", type=str2bool, default=None,
                   help="query text is the full target caption ('<adj> <noun>' on MIT-States) (default: False)")
    p.add_argument("--learning_rate", type=float, default=1e-2, help="SGD learning rate (ResNet body at 0.1x)")
    p.add_argument("--learning_rate_decay_frequency", type=int, default=None,
                   help="multiply the learning rate by 0.1 every N iterations (default: 9999999)" + syn.format(200))
    p.add_argument("--batch_size", type=int, default=32, help="training batch size (global, over all processes)")
    p.add_argument("--weight_decay", type=float, default=None, help="SGD weight decay (default: 1e-06)" + syn.format(5e-5))
    p.add_argument("--category_to_train", type=str, default="all", choices=["all", "dress", "shirt", "toptee"],
                   help="Fashion IQ category")
    p.add_argument("--num_iters", type=int, default=None,
                   help="training iterations, exactly (default: 160000)" + syn.format(300))
    p.add_argument("--loss", type=str, default=None, choices=list(LOSS_NAMES),
                   help="base loss (default: soft_triplet)" + syn.format("batch_based_classification"))
    p.add_argument("--loader_num_workers", type=int, default=None, help="data loader processes (default: 4)" + syn.format(0))
    p.add_argument("--log_dir", type=str, default=None,
                   help="parent of the run folder (TensorBoard, checkpoints, metrics.json) (default: ../logs/)" + syn.format("logs"))
    p.add_argument("--test_only", type=str2bool, default=False, help="only evaluate --model_checkpoint")
    p.add_argument("--model_checkpoint", type=str, default="", help="checkpoint to evaluate (this project's or the original's)")
    # -- added
    g = p.add_argument_group("added")
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order, pairs and triplets")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    g.add_argument("--resume", type=str, default="", help="checkpoint to continue training from, exactly")
    g.add_argument("--save_every", type=int, default=None,
                   help="write latest_checkpoint.pth every N iterations; 0 = every epoch as the original (default: 0)" + syn.format(100))
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate every N iterations; 0 = after epochs 1, 4, 7, ... as the original (default: 0)" + syn.format(150))
    g.add_argument("--log_every", type=int, default=20, help="log the averaged losses every N iterations (one host sync)")
    g.add_argument("--image_size", type=int, default=None, help="resize + centre crop size (default: 224)" + syn.format(64))
    g.add_argument("--image_weights", type=str, default=None,
                   help="ResNet-18 init: imagenet, none or a state-dict path (default: imagenet)" + syn.format("none"))
    g.add_argument("--bert_model", type=str, default=None,
                   help="BERT name or local folder; all-MiniLM-L6-v2 = the packaged offline model "
                        "(default: bert-base-uncased)" + syn.format("all-MiniLM-L6-v2"))
    g.add_argument("--lstm_dim", type=int, default=512, help="LSTM text encoder width (word embedding and hidden)")
    g.add_argument("--loss_weights", type=float, nargs=4, default=[1.0, 0.1, 0.1, 0.01],
                   metavar=("BASE", "L2", "L2_TEXT", "ROT_SYM"), help="weights of the loss terms (ComposeAE Eq. 13)")
    g.add_argument("--triplet_grad_scale", type=float, default=0.5,
                   help="soft-triplet gradient scale: 0.5 reproduces the original, whose hand-written numpy backward "
                        "dropped the factor 2 of d||x-y||^2/dx; 1.0 = the true gradient of the loss")
    g.add_argument("--train_eval_queries", type=int, default=None,
                   help="seeded sample of training queries for the train-split metrics (default: 9600)" + syn.format(500))
    g.add_argument("--eval_batch_size", type=int, default=0, help="evaluation batch size; 0 = --batch_size")
    g.add_argument("--best_metric", type=str, default="auto",
                   help="test metric that picks best_checkpoint.pth; auto = recall_top1_correct_composition, or the "
                        "mean recall_top10 over Fashion IQ categories")
    g.add_argument("--exclude_source_adj", type=str2bool, default=False,
                   help="MIT-States training targets never take the source's own adjective (the original allowed it)")
    g.add_argument("--amp", type=str2bool, default=False, help="bf16 autocast (mixed precision) for the forward passes")
    g.add_argument("--channels_last", type=str2bool, default=False, help="channels_last memory format for the images")
    g.add_argument("--image_cache", type=str, default="", help="folder for the decode-once uint8 image cache ('' = off)")
    g.add_argument("--compile", type=str2bool, default=False, help="torch.compile the image encoder (opt-in)")
    g.add_argument("--fuse_image_passes", type=str2bool, default=False,
                   help="one ResNet pass over query and target images together (faster at small batches; BatchNorm "
                        "then uses the statistics of all 2B images instead of the original's two passes of B)")
    g.add_argument("--cudnn_benchmark", type=str2bool, default=False,
                   help="let cuDNN time its convolution algorithms for the fixed image shapes (CUDA)")
    g.add_argument("--cuda_graph", type=str2bool, default=False,
                   help="capture the training step (forward, backward, SGD update) as a CUDA graph and replay it "
                        "(one process, CUDA, frozen BERT text encoder; recaptured when the learning rate changes)")
    return p


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the flags left as None: the synthetic preset for --dataset synthetic, else the original's defaults."""
    preset = SYNTHETIC_PRESET if args.dataset == "synthetic" else {}
    for key, value in {**ORIGINAL_DEFAULTS, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.dataset_path is None:
        raise UserInputError(f"--dataset {args.dataset} needs --dataset_path (the folder of the downloaded dataset)")
    if args.eval_batch_size <= 0:
        args.eval_batch_size = args.batch_size
    for name in ("batch_size", "num_iters", "learning_rate_decay_frequency", "image_size", "log_every"):
        if getattr(args, name) <= 0:
            raise UserInputError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.test_only and not args.model_checkpoint:
        raise UserInputError("--test_only True needs --model_checkpoint PATH")
    if args.cuda_graph and not args.use_bert:
        raise UserInputError("--cuda_graph True needs --use_bert True: the LSTM's inputs change shape with every "
                             "batch's text lengths, so its step cannot be captured; drop --cuda_graph for the LSTM")
    if args.cuda_graph and args.compile:
        raise UserInputError("--cuda_graph True and --compile True cannot be combined; pick one")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
def atomic_write(path: str, write, mode: str = "wb") -> None:
    """``write(file)`` into a temp file in the same folder, flushed to disk, then renamed over ``path``: readers
    see the old file or the whole new one, never a torn one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: str, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def read_checkpoint(path: str) -> dict:
    """Reads this project's checkpoints and the original code's ({'it', 'opt', 'model_state_dict'}).

    The original pickled an argparse.Namespace as 'opt'; PyTorch's safe loader refuses unknown classes, so exactly
    that one class is allowed (safety stays on).
    """
    if not os.path.isfile(path):
        raise UserInputError(f"checkpoint {path} does not exist; pass the path of a latest_checkpoint.pth")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torn, foreign or unsafe file
        raise UserInputError(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:100]}); pass a checkpoint written by main.py") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise UserInputError(f"checkpoint {path} has no 'model_state_dict'; pass a checkpoint written by main.py")
    return ckpt


def rng_state(model) -> dict:
    """This process's random state: torch CPU and CUDA generators and the soft-triplet sampler's generator."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if model.loss_generator is not None:
        state["loss"] = model.loss_generator.get_state()
    return state


def set_rng_state(model, states) -> None:
    """Restores ``rng_state`` of this process (checkpoints hold one state per process, in rank order)."""
    rank, _ = distributed_world()
    state = states[min(rank, len(states) - 1)] if isinstance(states, list) else states
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "loss" in state and model.loss_generator is not None:
        model.loss_generator.set_state(state["loss"])


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def create_model_and_optimizer(args, texts: Sequence[str], vocab: dict | None = None):
    """The model and the original's SGD: ``img_model.fc`` at the learning rate, the rest of the ResNet at 0.1x,
    everything else at 1x; momentum 0.9; the rate x0.1 every --learning_rate_decay_frequency iterations."""
    if args.use_bert:
        encoder = text_model.build_text_encoder("bert", bert_model=args.bert_model)
    else:
        encoder = text_model.build_text_encoder("lstm", texts, lstm_dim=args.lstm_dim, vocab=vocab)
    model = models.build_model(args.model, encoder, image_embed_dim=args.image_embed_dim,
                               image_weights=args.image_weights, triplet_grad_scale=args.triplet_grad_scale)
    model.fuse_image_passes = args.fuse_image_passes
    if distributed_world()[1] > 1:  # BatchNorm statistics of the global batch (before the optimizer sees the params)
        model = convert_to_global_batchnorm(model)
    fc = list(model.img_model.fc.parameters())
    seen = {id(p) for p in fc}
    body = [p for p in model.img_model.parameters() if id(p) not in seen]
    seen |= {id(p) for p in body}
    rest = [p for p in model.parameters() if id(p) not in seen]
    lr = args.learning_rate
    groups = [{"params": fc, "lr": lr}, {"params": body, "lr": 0.1 * lr}, {"params": rest, "lr": lr}]
    # fused=None lets PyTorch pick its fastest implementation (foreach on CUDA); the math is plain SGD either way
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    freq = args.learning_rate_decay_frequency
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.1 ** (it // freq))
    return model, optimizer, scheduler


def run_folder(args) -> str:
    """Creates and returns the original's run folder <log_dir>/<Mon DD_HH-MM-SS>_<host><comment>; a run started in
    the same second with the same comment gets <name>_1, _2, ... instead of sharing (overwriting) the folder."""
    stamp = datetime.now().strftime("%b%d_%H-%M-%S")
    base = os.path.join(args.log_dir, f"{stamp}_{socket.gethostname()}{args.comment}")
    os.makedirs(args.log_dir, exist_ok=True)
    for n in range(1000):
        folder = f"{base}_{n}" if n else base
        try:
            os.mkdir(folder)  # atomic: concurrent runs cannot both get it
            return folder
        except FileExistsError:
            continue
    raise UserInputError(f"{base}: 1000 runs started in this second; use --comment to tell them apart")


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

    ``texts``: B strings, or their (B, T) features from a frozen text encoder (see ``CudaGraphStep``).
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


class CudaGraphStep:
    """``--cuda_graph``: ``train_one_step`` with forward, backward and the SGD update captured once as a CUDA graph
    and replayed for every batch of the same shape (opt-in, not the original).

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


def make_train_step(args):
    """The training step function: ``train_one_step``, or a ``CudaGraphStep`` with --cuda_graph."""
    return CudaGraphStep() if args.cuda_graph else train_one_step


def evaluate_all(args, model, tasks: dict, device) -> dict[str, float]:
    """'train <metric>' and 'test <metric>' for the fixed retrieval tasks, printed as the original printed them."""
    out = {}
    for split, (dataset, task) in tasks.items():
        metrics = test_retrieval.evaluate(model, dataset, task, batch_size=args.eval_batch_size, device=device,
                                          num_workers=args.loader_num_workers, amp=args.amp, desc=f"eval {split}")
        out.update({f"{split} {name}": value for name, value in metrics.items()})
    if distributed_world()[0] == 0:
        for name, value in out.items():
            print("    ", name, round(value, 4), flush=True)
    return out


def best_score(metrics: dict[str, float], name: str) -> float:
    if name != "auto":
        if f"test {name}" not in metrics:
            raise UserInputError(f"--best_metric {name}: no such test metric; use one of "
                                 f"{', '.join(k[5:] for k in metrics if k.startswith('test '))}")
        return metrics[f"test {name}"]
    if "test recall_top1_correct_composition" in metrics:
        return metrics["test recall_top1_correct_composition"]
    r10 = [v for k, v in metrics.items() if k.startswith("test recall_top10_correct_")]
    return sum(r10) / len(r10)


def write_json(path: str, data) -> None:
    atomic_write(path, lambda f: json.dump(data, f, indent=2), mode="w")


class Run:
    """What a run writes: TensorBoard scalars, metrics.json and checkpoints in one run folder.

    Only the process of rank 0 writes (``enabled``); the others keep the same interface and write nothing.
    """

    def __init__(self, args, folder: str, enabled: bool = True):
        self.args, self.folder, self.enabled = args, folder, enabled
        self.history: list[dict] = []
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(folder, exist_ok=True)
        self.writer = SummaryWriter(folder)
        for key, value in vars(args).items():
            self.writer.add_text(key, str(value))
        previous = os.path.join(folder, "metrics.json")
        if os.path.exists(previous):  # a resumed run keeps its history
            with open(previous) as f:
                self.history = json.load(f).get("history", [])

    def scalars(self, values: dict[str, float], it: int) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, it)

    def metrics(self, metrics: dict[str, float], it: int) -> None:
        self.scalars(metrics, it)
        self.history.append({"it": it, **metrics})
        if self.enabled:
            write_json(os.path.join(self.folder, "metrics.json"), {"latest": self.history[-1], "history": self.history})

    def save(self, name: str, state_fn) -> None:
        """Writes ``state_fn()`` atomically to <run folder>/<name> (rank 0 only; every rank calls state_fn)."""
        state = state_fn()
        if self.enabled:
            save_checkpoint(os.path.join(self.folder, name), state)

    def close(self, final: dict[str, float]) -> None:
        if not self.enabled:
            return
        from torch.utils.tensorboard.summary import hparams

        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(self.args).items()}
        for summary in hparams(hp, {k: v for k, v in final.items() if k.startswith("test ")}):
            self.writer.file_writer.add_summary(summary)
        self.writer.close()


def checkpoint_state(args, model, optimizer, scheduler, it: int, epoch: int, batch_in_epoch: int, best: float) -> dict:
    """The full training state. Keys ``it``, ``opt`` and ``model_state_dict`` are the original's, so tools written
    for its checkpoints read these; ``rng`` holds every process's random state (a collective: all ranks call it)."""
    rngs = [rng_state(model)]
    _, world = distributed_world()
    if world > 1:
        rngs = [None] * world
        torch.distributed.all_gather_object(rngs, rng_state(model))
    vocab = model.text_model.vocab.word2id if model.text_model is not None else None
    return {"it": it, "opt": argparse.Namespace(**vars(args)), "model_state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "best": best, "rng": rngs, "vocab": vocab, "args": vars(args),
            "format": "composeae-repro/1"}


def mean_over_processes(sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
    """Averages of the summed loss terms over the iterations and the processes (one host sync)."""
    values = torch.stack(list(sums.values())) / count  # (T,)
    _, world = distributed_world()
    if world > 1:
        torch.distributed.all_reduce(values)
        values /= world
    return dict(zip(sums, values.tolist()))


def make_train_loader(args, trainset, sampler, device: torch.device) -> torch.utils.data.DataLoader:
    """The training DataLoader over ``sampler``'s batches (also used by benchmark.py)."""
    _, world = distributed_world()
    return torch.utils.data.DataLoader(
        trainset, batch_sampler=sampler, num_workers=args.loader_num_workers,
        collate_fn=functools.partial(datasets.collate_train, keep_size=world > 1),
        pin_memory=device.type == "cuda", persistent_workers=args.loader_num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed))  # own generator: worker seeds leave the global RNG alone


def place_model(args, model, device: torch.device):
    """Moves the model to ``device`` with the speed options: channels_last ResNet, torch.compile (opt-in),
    cuDNN autotuning (also used by benchmark.py)."""
    model.to(device)
    if args.channels_last:
        model.img_model.to(memory_format=torch.channels_last)
    if args.compile:
        model.img_model.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    return model


def train(args, model, optimizer, scheduler, trainset, tasks, run: Run, device, start: dict | None,
          step_model=None) -> dict:
    """The training loop: exactly --num_iters steps, periodic logging, evaluation and atomic checkpoints.

    The original checked ``it < num_iters`` only between epochs, so it ran up to one epoch past --num_iters, and it
    never evaluated or saved the final weights; here training stops at --num_iters exactly, then evaluates and saves.

    ``step_model`` is what the training step calls (the DistributedDataParallel wrapper with several processes);
    ``model`` is the plain model that is evaluated and saved.
    """
    step_model = step_model or model
    rank, world = distributed_world()
    sampler = datasets.EpochBatchSampler(trainset, args.batch_size, args.seed, rank=rank, world_size=world)
    if len(sampler) == 0:
        raise UserInputError(f"{args.dataset_path}: {len(trainset)} training items, fewer than --batch_size "
                             f"{args.batch_size}; lower --batch_size")
    loader = make_train_loader(args, trainset, sampler, device)
    train_step = make_train_step(args)
    epoch_len = len(sampler)
    save_every = args.save_every or epoch_len  # 0: every epoch, as the original

    def eval_due(it: int) -> bool:
        if args.eval_every:
            return it % args.eval_every == 0
        # the original tested at the start of epochs 1, 4, 7, ... (epoch % 3 == 1), i.e. after 1, 4, 7 epochs
        return it % epoch_len == 0 and (it // epoch_len) % 3 == 1

    it, epoch, batch_in_epoch, best = 0, 0, 0, -math.inf
    if start is not None:
        it, epoch, batch_in_epoch, best = start["it"], start["epoch"], start["batch_in_epoch"], start["best"]
    latest = os.path.join(run.folder, "latest_checkpoint.pth")
    sums, count, metrics = {}, 0, {}
    model.train()
    progress = tqdm_bar(total=args.num_iters, initial=it, desc="train", disable=rank != 0)
    try:  # an error is printed after the bar's last line, not on it
        while it < args.num_iters:
            sampler.set_epoch(epoch)
            sampler.set_start_batch(batch_in_epoch)
            for batch in loader:
                if len(batch["text"]) < 2:  # all but one item had unreadable images: BatchNorm needs 2
                    continue
                terms = train_step(step_model, batch, optimizer, scheduler, args, device)
                it, batch_in_epoch, count = it + 1, batch_in_epoch + 1, count + 1
                sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
                progress.update(1)
                log_due = it % args.log_every == 0 or it == args.num_iters
                if log_due or eval_due(it) or it % save_every == 0:  # never evaluate or save diverged weights
                    averages = mean_over_processes(sums, count)
                    if not all(math.isfinite(v) for v in averages.values()):
                        raise TrainingDiverged(
                            f"the loss is not finite ({averages}) in iterations {it - count + 1}..{it}; stopped. The last "
                            f"good checkpoint is {latest if os.path.exists(latest) else 'none (none was written yet)'}; "
                            f"lower --learning_rate or resume from it")
                if log_due:
                    averages["learning_rate"] = optimizer.param_groups[0]["lr"]
                    run.scalars(averages, it)
                    progress.set_postfix(loss=f"{averages['total training loss']:.4f}")
                    sums, count = {}, 0

                def state():
                    return checkpoint_state(args, model, optimizer, scheduler, it, epoch, batch_in_epoch, best)

                if eval_due(it) or it == args.num_iters:
                    metrics = evaluate_all(args, model, tasks, device)
                    model.train()
                    run.metrics(metrics, it)
                    score = best_score(metrics, args.best_metric)
                    if score > best:
                        best = score
                        run.save("best_checkpoint.pth", state)
                if it % save_every == 0 or it == args.num_iters:
                    run.save("latest_checkpoint.pth", state)
                if it >= args.num_iters:
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
    finally:
        progress.close()
    return metrics


def tqdm_bar(**kw):
    from tqdm import tqdm

    return tqdm(dynamic_ncols=True, mininterval=1.0, **kw)


# ----------------------------------------------------------------------------------------------------------------
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


def run_main(args: argparse.Namespace) -> int:
    device = init_distributed(args)
    rank, world = distributed_world()
    if args.cuda_graph and (device.type != "cuda" or world > 1) and not args.test_only:
        raise UserInputError(f"--cuda_graph True needs one process on a CUDA device (here: {device.type}, "
                             f"{world} process{'es' if world > 1 else ''}); drop --cuda_graph")
    torch.manual_seed(args.seed)  # identical initial weights on every process
    logger.info("arguments: %s", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    trainset, testset = datasets.build_datasets(
        args.dataset, args.dataset_path, image_size=args.image_size, use_complete_text_query=args.use_complete_text_query,
        category=args.category_to_train, seed=args.seed, image_cache=args.image_cache or None,
        exclude_source_adj=args.exclude_source_adj)
    logger.info("trainset size: %d, testset size: %d", len(trainset), len(testset))

    ckpt = read_checkpoint(args.model_checkpoint if args.test_only else args.resume) if (args.test_only or args.resume) else None
    vocab = ckpt.get("vocab") if ckpt else None
    model, optimizer, scheduler = create_model_and_optimizer(args, trainset.get_all_texts(), vocab)
    if ckpt is not None:
        if model.text_model is not None and vocab is None:
            logger.warning("%s holds no vocabulary (an original-code checkpoint): the LSTM vocabulary is rebuilt from "
                           "the training texts in sorted-listing order, but the original numbered words in its "
                           "machine's os.listdir order, so its word embeddings may be matched to the wrong words",
                           args.model_checkpoint or args.resume)
        models.load_model_state(model, ckpt["model_state_dict"], args.model_checkpoint or args.resume)
    # the soft-triplet sampler: the same seed on every process, so all draw the same triplets of the global batch
    model.loss_generator = torch.Generator(device).manual_seed(args.seed)
    torch.manual_seed(args.seed + rank)  # dropout differs between processes
    place_model(args, model, device)
    tasks = {"train": (trainset, trainset.train_task(args.train_eval_queries, args.seed)),
             "test": (testset, testset.test_task())}

    folder = os.path.dirname(os.path.abspath(args.resume)) if args.resume else (run_folder(args) if rank == 0 else "")
    if world > 1:  # the folder name holds the time: take rank 0's
        names = [folder]
        torch.distributed.broadcast_object_list(names, src=0)
        folder = names[0]
    run = Run(args, folder, enabled=rank == 0)
    logger.info("log files saved to %s", folder)
    if args.test_only:
        metrics = evaluate_all(args, model, tasks, device)
        run.metrics(metrics, int(ckpt.get("it", 0)))
        run.close(metrics)
        return 0
    start = None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(model, ckpt["rng"])
        start = ckpt
        saved_batch = (ckpt.get("args") or {}).get("batch_size", args.batch_size)
        if saved_batch != args.batch_size:
            raise UserInputError(f"--resume {args.resume}: it was trained with --batch_size {saved_batch}, not "
                                 f"{args.batch_size}; resume with --batch_size {saved_batch} (the data position "
                                 f"within the epoch depends on it)")
        if ckpt["it"] >= args.num_iters:
            logger.warning("--resume %s is at iteration %d already: --num_iters %d trains nothing more",
                           args.resume, ckpt["it"], args.num_iters)
        logger.info("resuming from %s at iteration %d", args.resume, ckpt["it"])
    step_model = model
    if world > 1:
        step_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    try:
        metrics = train(args, model, optimizer, scheduler, trainset, tasks, run, device, start, step_model)
    finally:
        if run.enabled:
            run.writer.flush()
    run.close(metrics)
    logger.info("finished training; checkpoints and metrics.json in %s", folder)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (one line already printed)
        return int(exc.code or 0)
    try:
        args = resolve_defaults(args)
        return run_main(args)
    except UserInputError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
