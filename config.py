"""The run settings of main.py: its flags (``get_args_parser``), their defaults (the original's, the dataset's
registry entry: ``retrieval_datasets.registry``), their checks, and the settings a checkpoint carries
(``checkpoint_args``), taken by --test_only and --resume (``take_checkpoint_settings``)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from typing import Sequence

import torch

import cirr_submission
import img_text_composition_models as models
from checkpoint import read_checkpoint
from checksums import read_verified
from checkpoint_settings import recorded_settings, validate_checkpoint_settings
from errors import OneLineParser, UserInputError
from retrieval_datasets.fashioniq import FASHION_IQ_PROTOCOLS
from retrieval_datasets.registry import DATASET_NAMES, SELECT_ON, dataset_spec
from torch_functions import LOSS_NAMES

logger = logging.getLogger("main")  # the name its log lines carry

# main.py --help's description
DESCRIPTION = "Train and evaluate ComposeAE / TIRG composed image retrieval models."

# Original defaults of the flags that a dataset's preset changes (None in the parser means "not given").
ORIGINAL_DEFAULTS = dict(
    model="composeAE", use_bert=False, loss="soft_triplet", num_iters=160000, learning_rate_decay_frequency=9999999,
    loader_num_workers=4, image_size=224, image_weights="imagenet",
    bert_model="bert-base-uncased", train_eval_queries=9600, eval_every=0, save_every=0,
    use_complete_text_query=False, weight_decay=1e-6, threads=0,
)
# Flags that say nothing about the run (-f: Jupyter's kernel file): left out of TensorBoard's args card and HParams.
TENSORBOARD_LEFT_OUT = ("f",)
# The embedded default (--dataset synthetic): a run that finishes in a few minutes on a 2-core CPU with no download.
SYNTHETIC_PRESET = dataset_spec("synthetic").preset


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


# A boolean flag: --amp, --amp True, --amp False (and the original's --use_bert True)
BOOL = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, unless its help already states it (the flags with a synthetic preset)."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def get_args_parser() -> argparse.ArgumentParser:
    """The flags, grouped by purpose; the original's keep their names, spellings and defaults."""
    p = OneLineParser(prog="main.py", description=DESCRIPTION,
                      formatter_class=DefaultsFormatter)

    def syn(name: str) -> str:  # the synthetic preset's value of a flag, as --help shows it
        return f" [synthetic: {SYNTHETIC_PRESET[name]}]"
    p.add_argument("-f", type=str, default="", help="ignored (lets the original run inside Jupyter)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="synthetic", choices=list(DATASET_NAMES),
                   help="dataset, in its published layout under --dataset_path; triplets = your own "
                        "DIR/triplets.csv (source,text,target,split)")
    g.add_argument("--dataset_path", type=str, default=None, help="dataset folder" + syn("dataset_path"))
    g.add_argument("--category_to_train", type=str, default="all", choices=["all", "dress", "shirt", "toptee"],
                   help="Fashion IQ category")
    g.add_argument("--image_size", type=int, default=None, help="resize + centre crop size (default: 224)" + syn("image_size"))
    g.add_argument("--exclude_source_adj", **BOOL, default=False,
                   help="MIT-States training targets never take the source's own adjective (the original allowed it)")
    g.add_argument("--loader_num_workers", type=int, default=None, help="data loader processes (default: 4)" + syn("loader_num_workers"))
    g.add_argument("--image_cache", type=str, default="", help="folder for the decode-once uint8 image cache ('' = off)")
    g.add_argument("--val_nouns", type=int, default=0,
                   help="MIT-States with --select_on val: N training nouns held out (seeded) as the validation split")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="composeAE", choices=list(models.MODELS), help="composition model")
    g.add_argument("--image_embed_dim", type=int, default=512, help="image embedding width")
    g.add_argument("--image_weights", type=str, default=None,
                   help="ResNet-18 init: imagenet, none or a state-dict path (default: imagenet)" + syn("image_weights"))

    g = p.add_argument_group("text")
    g.add_argument("--use_bert", **BOOL, default=None,
                   help="frozen BERT text encoder instead of the LSTM (default: False)" + syn("use_bert"))
    g.add_argument("--bert_model", type=str, default=None,
                   help="BERT name or local folder; all-MiniLM-L6-v2 = the packaged offline model "
                        "(default: bert-base-uncased)" + syn("bert_model"))
    g.add_argument("--lstm_dim", type=int, default=512, help="LSTM text encoder width (word embedding and hidden)")
    g.add_argument("--use_complete_text_query", **BOOL, default=None,
                   help="query text is the full target caption ('<adj> <noun>' on MIT-States) (default: False)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", type=str, default=None, choices=list(LOSS_NAMES),
                   help="base loss (default: soft_triplet)" + syn("loss"))
    g.add_argument("--loss_weights", type=float, nargs=4, default=[1.0, 0.1, 0.1, 0.01],
                   metavar=("BASE", "L2", "L2_TEXT", "ROT_SYM"), help="weights of the loss terms (ComposeAE Eq. 13)")
    g.add_argument("--triplet_grad_scale", type=float, default=0.5,
                   help="soft-triplet gradient scale: 0.5 reproduces the original, whose hand-written numpy backward "
                        "dropped the factor 2 of d||x-y||^2/dx; 1.0 = the true gradient of the loss")
    g.add_argument("--learning_rate", type=float, default=1e-2,
                   help="SGD learning rate (ResNet body at --resnet_lr_scale of it)")
    g.add_argument("--resnet_lr_scale", type=float, default=None,
                   help="learning rate of the ResNet body (all but its fc) relative to --learning_rate "
                        "(default: 0.1, as the originals on photos; 1.0 on css3d, as TIRG trains its renders, and on "
                        "synthetic, whose ResNet starts from scratch)")
    g.add_argument("--learning_rate_decay_frequency", type=int, default=None,
                   help="multiply the learning rate by 0.1 every N iterations (default: 9999999)" + syn("learning_rate_decay_frequency"))
    g.add_argument("--weight_decay", type=float, default=None, help="SGD weight decay (default: 1e-06)" + syn("weight_decay"))
    g.add_argument("--batch_size", type=int, default=32, help="training batch size (global, over all processes)")
    g.add_argument("--num_iters", type=int, default=None,
                   help="the total number of training iterations, exactly; a resumed run continues up to it (default: "
                        "160000)" + syn("num_iters"))
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order, pairs and triplets")

    g = p.add_argument_group("evaluation")
    g.add_argument("--test_only", **BOOL, default=False, help="only evaluate --model_checkpoint")
    g.add_argument("--model_checkpoint", type=str, default="", help="checkpoint to evaluate (this project's or the original's)")
    g.add_argument("--eval_splits", type=str, default="test",
                   help="with --test_only: the splits to evaluate, comma-separated (test, train)")
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate every N iterations; 0 = the dataset's schedule: after epochs 1, 4, 7, ... as the "
                        f"original on {', '.join(eval_schedule_datasets('epochs_1_4_7'))}; 8 times per run, evenly "
                        f"spaced, the last at the end, on {', '.join(eval_schedule_datasets('eight_per_run'))} "
                        "(default: 0)" + syn("eval_every"))
    g.add_argument("--train_eval_queries", type=int, default=None,
                   help="seeded sample of training queries for the train-split metrics, at most as many as there are "
                        "(default: 9600)" + syn("train_eval_queries"))
    g.add_argument("--eval_batch_size", type=int, default=0, help="evaluation batch size; 0 = --batch_size")
    g.add_argument("--best_metric", type=str, default="auto",
                   help="test metric that picks best_checkpoint.pth; auto = recall_top1_correct_composition, or the "
                        "mean recall_top10 over Fashion IQ categories")
    g.add_argument("--select_on", type=str, default="test", choices=list(SELECT_ON),
                   help="split that picks best_checkpoint.pth: test = the original codes' selection on the test "
                        "split; val = a validation split, with the test split evaluated once for the best checkpoint")
    g.add_argument("--fashioniq_protocol", type=str, default="composeae", choices=list(FASHION_IQ_PROTOCOLS),
                   help="composeae = the original's (one gallery over the categories, recall@1..100); standard = "
                        "CLIP4Cir's (per-category galleries, R@10 / R@50 and their mean)")
    g.add_argument("--submission_dir", type=str, default="",
                   help="CIRR: write the test1 prediction files of the CIRR server here (with --test_only True, or "
                        "after training with --select_on val)")

    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--log_dir", type=str, default="logs",
                   help="parent of the run folder (TensorBoard, checkpoints, metrics.json)")
    g.add_argument("--comment", type=str, default="", help="suffix of the run folder name")
    g.add_argument("--resume", type=str, default="", help="latest_checkpoint.pth to continue training from, exactly")
    g.add_argument("--ignore_checksum", **BOOL, default=False,
                   help="--test_only / --resume: use a checkpoint whose SHA-256 differs from the one listed in the "
                        "checksums.sha256 beside it")
    g.add_argument("--save_every", type=int, default=None,
                   help="write latest_checkpoint.pth every N iterations; 0 = every epoch as the original (default: 0)" + syn("save_every"))
    g.add_argument("--log_every", type=int, default=20, help="log the averaged losses every N iterations (one host sync)")

    g = p.add_argument_group("speed", "opt-in; each computes what the default computes, unless its help says otherwise")
    g.add_argument("--amp", **BOOL, default=False, help="bf16 autocast (mixed precision) for the forward passes")
    g.add_argument("--channels_last", **BOOL, default=False, help="channels_last memory format for the images")
    g.add_argument("--compile", **BOOL, default=False, help="torch.compile the image encoder")
    g.add_argument("--fuse_image_passes", **BOOL, default=False,
                   help="one ResNet pass over query and target images together (faster at small batches; BatchNorm "
                        "then uses the statistics of all 2B images instead of the original's two passes of B)")
    g.add_argument("--cudnn_benchmark", **BOOL, default=False,
                   help="let cuDNN time its convolution algorithms for the fixed image shapes (CUDA)")
    g.add_argument("--allow_tf32", **BOOL, default=True,
                   help="TF32 cuDNN convolutions and LSTMs on Ampere and later GPUs (PyTorch's default); False = "
                        "fp32, as the original ran them")
    g.add_argument("--cuda_graph", **BOOL, default=False,
                   help="capture the training step (forward, backward, SGD update) as a CUDA graph and replay it "
                        "(one process, CUDA, frozen BERT text encoder; recaptured when the learning rate changes)")

    g = p.add_argument_group("device and distributed",
                             "several processes: torchrun --nproc_per_node N main.py ... (--batch_size is global)")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; 0 = torch's default; 1 is faster on a CPU that other jobs share "
                        "(default: 0)" + syn("threads"))
    return p


def eval_schedule_datasets(schedule: str) -> list[str]:
    """The --dataset names whose registry entry evaluates on ``schedule`` with --eval_every 0."""
    return [name for name in DATASET_NAMES if dataset_spec(name).eval_schedule == schedule]


def apply_threads(args: argparse.Namespace) -> None:
    """--threads N: torch's intra-op CPU threads (and its inter-op threads, where torch still allows setting them:
    only before its first parallel work); 0 leaves torch's defaults."""
    if args.threads:
        torch.set_num_threads(args.threads)
        with contextlib.suppress(RuntimeError):  # inter-op threads are fixed once parallel work has started
            torch.set_num_interop_threads(args.threads)


def default_resnet_lr_scale(dataset: str) -> float:
    """The dataset's registry entry: TIRG's main.py trains the pretrained ResNet body at 0.1x on the photo datasets
    and at 1x on CSS3D."""
    return dataset_spec(dataset).resnet_lr_scale


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the flags left as None: the dataset's preset (its registry entry: --dataset synthetic's), else the
    original's defaults; then checks the flags and applies --threads (``apply_threads``), before anything heavy
    runs."""
    spec = dataset_spec(args.dataset)
    for key, value in {**ORIGINAL_DEFAULTS, **spec.preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.resnet_lr_scale is None:
        args.resnet_lr_scale = spec.resnet_lr_scale
    if args.dataset_path is None:
        raise UserInputError(f"--dataset {args.dataset} needs --dataset_path (the folder of the downloaded dataset)")
    check_ranges(args)
    if args.eval_batch_size <= 0:
        args.eval_batch_size = args.batch_size
    if args.test_only and not args.model_checkpoint:
        raise UserInputError("--test_only True needs --model_checkpoint PATH")
    if args.cuda_graph and not args.use_bert:
        raise UserInputError("--cuda_graph True needs --use_bert True: the LSTM's inputs change shape with every "
                             "batch's text lengths, so its step cannot be captured; drop --cuda_graph for the LSTM")
    if args.cuda_graph and args.compile:
        raise UserInputError("--cuda_graph True and --compile True cannot be combined; pick one")
    if args.submission_dir:
        if spec.submission is None:
            raise UserInputError(f"--submission_dir writes CIRR test1 predictions; --dataset is {args.dataset}")
        if not args.test_only and args.select_on != "val":
            raise UserInputError("--submission_dir writes the test1 predictions of --test_only True, or of the best "
                                 "checkpoint after training with --select_on val; pass one of them")
        cirr_submission.check_submission_dir(args.submission_dir)  # before anything runs; created if missing
    elif spec.submission is not None and args.select_on == "val" and not args.test_only:
        raise UserInputError("--select_on val on CIRR makes test1 the test split, which only the CIRR server scores: "
                             "pass --submission_dir DIR for its prediction files")
    if args.val_nouns < 0:
        raise UserInputError(f"--val_nouns must be >= 0, got {args.val_nouns}")
    apply_threads(args)
    return args


POSITIVE_FLAGS = ("batch_size", "num_iters", "learning_rate_decay_frequency", "image_size", "log_every",
                  "image_embed_dim", "lstm_dim")
NON_NEGATIVE_FLAGS = ("learning_rate", "resnet_lr_scale", "weight_decay", "loader_num_workers", "train_eval_queries", "save_every",
                      "eval_every", "threads")
FINITE_FLAGS = ("learning_rate", "weight_decay", "loss_weights", "triplet_grad_scale", "resnet_lr_scale")


def check_ranges(args: argparse.Namespace) -> None:
    """Numeric flags out of range, and a --comment that would leave --log_dir: one UserInputError each."""
    for name in FINITE_FLAGS:
        values = getattr(args, name)
        if not all(math.isfinite(v) for v in (values if isinstance(values, list) else [values])):
            raise UserInputError(f"--{name} must be finite, got {values}")
    for name in POSITIVE_FLAGS:
        if getattr(args, name) <= 0:
            raise UserInputError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in NON_NEGATIVE_FLAGS:
        if getattr(args, name) < 0:
            raise UserInputError(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if any(sep and sep in args.comment for sep in (os.sep, os.altsep, "\0")):
        raise UserInputError(f"--comment {args.comment!r}: it is part of the run folder's name, so it cannot hold "
                             f"'{os.sep}' (it would leave --log_dir); use letters, digits, '_' or '-'")


# The settings that define a run (model, data, training). --test_only and --resume take every one the user does not
# give from the checkpoint; given with another value, --resume refuses it and --test_only warns.
RUN_SETTINGS = (
    "model", "use_bert", "bert_model", "image_embed_dim", "lstm_dim", "image_size", "use_complete_text_query",  # model
    "loss", "loss_weights", "triplet_grad_scale",  # loss
    "dataset", "category_to_train", "exclude_source_adj",  # data
    "learning_rate", "resnet_lr_scale", "learning_rate_decay_frequency", "weight_decay", "batch_size",  # training
    "seed",
    "fuse_image_passes", "amp", "best_metric", "select_on", "val_nouns",  # numerics; the choice of the best
    "fashioniq_protocol",  # the evaluation protocol
)
# Also taken when not given, but free to change on --resume: they decide how a run is executed or observed.
OBSERVATION_SETTINGS = ("num_iters", "eval_every", "save_every", "log_every", "train_eval_queries", "dataset_path",
                        "image_weights")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, set[str]]:
    """``(args, given)``: the parsed flags (those not given are None or their default) and the names of the flags
    that ``argv`` sets explicitly (a second parse in which no flag has a default)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    bare = get_args_parser()
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return args, set(vars(bare.parse_args(argv)))


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _flag(name: str, value) -> str:
    shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"--{name} {shown}"


def take_checkpoint_settings(args: argparse.Namespace, ckpt: dict, given: set[str], source: str,
                             resume: bool) -> argparse.Namespace:
    """``args`` with the run's settings of checkpoint ``source`` (``checkpoint_args``) in every flag not ``given``
(an original-code checkpoint: its ``opt`` Namespace, and the original's behaviour for the flags it lacks).

    A given flag that differs: with ``resume``, a flag of RUN_SETTINGS is refused (it would change the computation
    the checkpoint continues); else (--test_only) the given value wins, with one warning per difference.
    ``--log_dir``, unless given, becomes the folder that holds the checkpoint's run folder (for --test_only of this
    project's checkpoints: its evaluation folder goes beside the run).
    """
    saved = checkpoint_args(ckpt)
    recorded = set(ckpt["args"] if isinstance(ckpt.get("args"), dict) else vars(ckpt.get("opt", argparse.Namespace())))
    taken, differ = [], []
    for name in RUN_SETTINGS + OBSERVATION_SETTINGS:
        value = getattr(saved, name)
        if name not in given:
            setattr(args, name, value)
            taken.append(_flag(name, value))
        elif name in RUN_SETTINGS and name in recorded and not _same(getattr(args, name), value):
            differ.append(name)  # (a flag the original code did not have is only its default, not a record)
    for name in differ:
        mine, theirs = _flag(name, getattr(args, name)), _flag(name, getattr(saved, name))
        if resume:
            raise UserInputError(f"--resume {source} was trained with {theirs}, not {mine}: that would change the "
                                 f"run it continues; drop --{name} (or start a new run from scratch)")
        logger.warning("%s was trained with %s; evaluating with the given %s", source, theirs, mine)
    if "log_dir" not in given and (resume or isinstance(ckpt.get("args"), dict)):
        args.log_dir = os.path.dirname(os.path.dirname(os.path.abspath(source)))  # where the checkpoint's run lies
    if taken:
        logger.info("settings taken from %s: %s", source, " ".join(taken))
    return args


def prepare_args(args: argparse.Namespace,
                 given: set[str]) -> tuple[argparse.Namespace, dict | None, str, str | None]:
    """``(args, ckpt, source, sha256)``: the checkpoint of --test_only / --resume checked against its run folder's
    checksums.sha256 (``checksums.read_verified``, its SHA-256 returned), read and checked (``read_checkpoint``,
    ``validate_checkpoint_settings``), its settings taken, the defaults resolved."""
    source = args.model_checkpoint if args.test_only else args.resume
    sha256, ckpt = read_verified(source, args.ignore_checksum, lambda: read_checkpoint(
        source, resume=not args.test_only)) if source else (None, None)
    if ckpt is not None:
        validate_checkpoint_settings(recorded_settings(ckpt), source)  # before any setting sizes a tensor
        args = take_checkpoint_settings(args, ckpt, given, source, resume=not args.test_only)
        if not args.test_only and "optimizer" not in ckpt:
            raise UserInputError(f"--resume {source} holds no optimizer state (a best_checkpoint.pth, or the original "
                                 f"code's); resume from a latest_checkpoint.pth, or evaluate it with --test_only True")
    return resolve_defaults(args), ckpt, source, sha256


def checkpoint_args(ckpt: dict) -> argparse.Namespace:
    """The settings a checkpoint was trained with, as a complete args Namespace.

    This project's checkpoints hold every resolved flag (``'args'``); the original code's hold its pickled
    ``opt`` Namespace, whose missing flags (the ones added here) take the original's behaviour, i.e. their
    defaults for a real dataset.
    """
    saved = ckpt.get("args")
    if not isinstance(saved, dict):
        opt = ckpt.get("opt")
        saved = dict(vars(opt)) if isinstance(opt, argparse.Namespace) else {}
    args = get_args_parser().parse_args([])
    known = {k: v for k, v in saved.items() if hasattr(args, k)}
    dataset = known.get("dataset", "mitstates")
    args.dataset = dataset if dataset in DATASET_NAMES else "mitstates"
    for key, value in known.items():
        setattr(args, key, value)
    if args.dataset_path is None:
        args.dataset_path = ""
    if getattr(args, "resnet_lr_scale", None) is None:
        args.resnet_lr_scale = default_resnet_lr_scale(args.dataset)
    for key, value in ORIGINAL_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args
