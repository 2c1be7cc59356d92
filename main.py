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
import logging
import math
import os
import shlex
import signal
import sys
from typing import Sequence

import torch

import img_text_composition_models as models
from checkpoint import WriteFailed, read_checkpoint, restart_from_checkpoint
from datasets import DATASET_NAMES, FASHION_IQ_PROTOCOLS, SELECT_ON
from distributed import init_distributed
from factory import build_experiment, run_info
from runlog import LOG_FORMAT, LogBuffer, Run, TqdmLogHandler, run_folder
from test_retrieval import NonFiniteFeaturesError
from errors import UserInputError
from distributed import distributed_world
from torch_functions import LOSS_NAMES
from training import (Interrupted, TrainingDiverged, best_metric_name, best_score, evaluate_all,
                      evaluate_best_on_test, metric_names, train)

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


class OneLineParser(argparse.ArgumentParser):
    """Bad flags: one line on stderr and exit code 2 (argparse's default adds the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    """The flags, grouped by purpose; the original's keep their names, spellings and defaults."""
    p = OneLineParser(prog="main.py", description=__doc__.split("\n\n")[0],
                      formatter_class=DefaultsFormatter)
    syn = " [synthetic: {}]"
    p.add_argument("-f", type=str, default="", help="ignored (lets the original run inside Jupyter)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="synthetic", choices=list(DATASET_NAMES),
                   help="dataset, in its published layout under --dataset_path; triplets = your own "
                        "DIR/triplets.csv (source,text,target,split)")
    g.add_argument("--dataset_path", type=str, default=None, help="dataset folder" + syn.format("data/synthetic"))
    g.add_argument("--category_to_train", type=str, default="all", choices=["all", "dress", "shirt", "toptee"],
                   help="Fashion IQ category")
    g.add_argument("--image_size", type=int, default=None, help="resize + centre crop size (default: 224)" + syn.format(64))
    g.add_argument("--exclude_source_adj", **BOOL, default=False,
                   help="MIT-States training targets never take the source's own adjective (the original allowed it)")
    g.add_argument("--loader_num_workers", type=int, default=None, help="data loader processes (default: 4)" + syn.format(0))
    g.add_argument("--image_cache", type=str, default="", help="folder for the decode-once uint8 image cache ('' = off)")
    g.add_argument("--val_nouns", type=int, default=0,
                   help="MIT-States with --select_on val: N training nouns held out (seeded) as the validation split")

    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="composeAE", choices=list(models.MODELS), help="composition model")
    g.add_argument("--image_embed_dim", type=int, default=512, help="image embedding width")
    g.add_argument("--image_weights", type=str, default=None,
                   help="ResNet-18 init: imagenet, none or a state-dict path (default: imagenet)" + syn.format("none"))

    g = p.add_argument_group("text")
    g.add_argument("--use_bert", **BOOL, default=None,
                   help="frozen BERT text encoder instead of the LSTM (default: False)" + syn.format(True))
    g.add_argument("--bert_model", type=str, default=None,
                   help="BERT name or local folder; all-MiniLM-L6-v2 = the packaged offline model "
                        "(default: bert-base-uncased)" + syn.format("all-MiniLM-L6-v2"))
    g.add_argument("--lstm_dim", type=int, default=512, help="LSTM text encoder width (word embedding and hidden)")
    g.add_argument("--use_complete_text_query", **BOOL, default=None,
                   help="query text is the full target caption ('<adj> <noun>' on MIT-States) (default: False)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--loss", type=str, default=None, choices=list(LOSS_NAMES),
                   help="base loss (default: soft_triplet)" + syn.format("batch_based_classification"))
    g.add_argument("--loss_weights", type=float, nargs=4, default=[1.0, 0.1, 0.1, 0.01],
                   metavar=("BASE", "L2", "L2_TEXT", "ROT_SYM"), help="weights of the loss terms (ComposeAE Eq. 13)")
    g.add_argument("--triplet_grad_scale", type=float, default=0.5,
                   help="soft-triplet gradient scale: 0.5 reproduces the original, whose hand-written numpy backward "
                        "dropped the factor 2 of d||x-y||^2/dx; 1.0 = the true gradient of the loss")
    g.add_argument("--learning_rate", type=float, default=1e-2,
                   help="SGD learning rate (ResNet body at --resnet_lr_scale of it)")
    g.add_argument("--resnet_lr_scale", type=float, default=None,
                   help="learning rate of the ResNet body (all but its fc) relative to --learning_rate "
                        "(default: 0.1, as the originals on photos; 1.0 on css3d, as TIRG trains its renders)")
    g.add_argument("--learning_rate_decay_frequency", type=int, default=None,
                   help="multiply the learning rate by 0.1 every N iterations (default: 9999999)" + syn.format(200))
    g.add_argument("--weight_decay", type=float, default=None, help="SGD weight decay (default: 1e-06)" + syn.format(5e-5))
    g.add_argument("--batch_size", type=int, default=32, help="training batch size (global, over all processes)")
    g.add_argument("--num_iters", type=int, default=None,
                   help="training iterations, exactly (default: 160000)" + syn.format(300))
    g.add_argument("--seed", type=int, default=0, help="seed of weights, data order, pairs and triplets")

    g = p.add_argument_group("evaluation")
    g.add_argument("--test_only", **BOOL, default=False, help="only evaluate --model_checkpoint")
    g.add_argument("--model_checkpoint", type=str, default="", help="checkpoint to evaluate (this project's or the original's)")
    g.add_argument("--eval_splits", type=str, default="test",
                   help="with --test_only: the splits to evaluate, comma-separated (test, train)")
    g.add_argument("--eval_every", type=int, default=None,
                   help="evaluate every N iterations; 0 = after epochs 1, 4, 7, ... as the original (default: 0)" + syn.format(150))
    g.add_argument("--train_eval_queries", type=int, default=None,
                   help="seeded sample of training queries for the train-split metrics (default: 9600)" + syn.format(500))
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
    g.add_argument("--log_dir", type=str, default=None,
                   help="parent of the run folder (TensorBoard, checkpoints, metrics.json) (default: ../logs/)" + syn.format("logs"))
    g.add_argument("--comment", type=str, default="", help="suffix of the run folder name")
    g.add_argument("--resume", type=str, default="", help="latest_checkpoint.pth to continue training from, exactly")
    g.add_argument("--save_every", type=int, default=None,
                   help="write latest_checkpoint.pth every N iterations; 0 = every epoch as the original (default: 0)" + syn.format(100))
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
    return p


def default_resnet_lr_scale(dataset: str) -> float:
    """TIRG's main.py trains the pretrained ResNet body at 0.1x on the photo datasets and at 1x on CSS3D."""
    return 1.0 if dataset == "css3d" else 0.1


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the flags left as None: the synthetic preset for --dataset synthetic, else the original's defaults."""
    preset = SYNTHETIC_PRESET if args.dataset == "synthetic" else {}
    for key, value in {**ORIGINAL_DEFAULTS, **preset}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.resnet_lr_scale is None:
        args.resnet_lr_scale = default_resnet_lr_scale(args.dataset)
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
        if args.dataset != "cirr":
            raise UserInputError(f"--submission_dir writes CIRR test1 predictions; --dataset is {args.dataset}")
        if not args.test_only and args.select_on != "val":
            raise UserInputError("--submission_dir writes the test1 predictions of --test_only True, or of the best "
                                 "checkpoint after training with --select_on val; pass one of them")
    elif args.dataset == "cirr" and args.select_on == "val" and not args.test_only:
        raise UserInputError("--select_on val on CIRR makes test1 the test split, which only the CIRR server scores: "
                             "pass --submission_dir DIR for its prediction files")
    if args.val_nouns < 0:
        raise UserInputError(f"--val_nouns must be >= 0, got {args.val_nouns}")
    return args


POSITIVE_FLAGS = ("batch_size", "num_iters", "learning_rate_decay_frequency", "image_size", "log_every",
                  "image_embed_dim", "lstm_dim")
NON_NEGATIVE_FLAGS = ("learning_rate", "resnet_lr_scale", "weight_decay", "loader_num_workers", "train_eval_queries", "save_every",
                      "eval_every")
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


def prepare_args(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, dict | None, str]:
    """``(args, ckpt, source)``: the checkpoint of --test_only / --resume read, its settings taken, the defaults
    resolved."""
    source = args.model_checkpoint if args.test_only else args.resume
    ckpt = read_checkpoint(source, resume=not args.test_only) if source else None
    if ckpt is not None:
        args = take_checkpoint_settings(args, ckpt, given, source, resume=not args.test_only)
        if not args.test_only and "optimizer" not in ckpt:
            raise UserInputError(f"--resume {source} holds no optimizer state (a best_checkpoint.pth, or the original "
                                 f"code's); resume from a latest_checkpoint.pth, or evaluate it with --test_only True")
    return resolve_defaults(args), ckpt, source


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


def eval_splits(args, tasks: dict) -> dict:
    """The tasks that --test_only evaluates (--eval_splits, in the original's order: train before test)."""
    names = [s.strip() for s in args.eval_splits.split(",") if s.strip()]
    if names == ["test"] and "test" not in tasks:  # no public test targets (CIRR's test1): the validation split
        names = [s for s in ("val",) if s in tasks]
        if not names:
            return {}
    unknown = [s for s in names if s not in tasks]
    if unknown or not names:
        raise UserInputError(f"--eval_splits {args.eval_splits}: use a comma-separated list of {', '.join(tasks)}")
    return {split: tasks[split] for split in tasks if split in names}


def run_main(args: argparse.Namespace, given: set[str] | None = None) -> int:
    """Trains, or with --test_only evaluates, as ``args`` say.

    ``args`` as the parser gives them (flags not given are None or their defaults; resolved args work too) and
    ``given``, the flags the user set (``parse_args``): --test_only and --resume take every other setting of the
    run from the checkpoint (``take_checkpoint_settings``).
    """
    early = LogBuffer()  # what is logged before the run folder exists goes into its out.log too
    logging.getLogger().addHandler(early)
    try:
        return _run(args, set(given or ()), early)
    finally:
        logging.getLogger().removeHandler(early)


def _run(args: argparse.Namespace, given: set[str], early) -> int:
    args, ckpt, source = prepare_args(args, given)
    device = init_distributed(args)
    rank, world = distributed_world()
    if args.cuda_graph and (device.type != "cuda" or world > 1) and not args.test_only:
        raise UserInputError(f"--cuda_graph True needs one process on a CUDA device (here: {device.type}, "
                             f"{world} process{'es' if world > 1 else ''}); drop --cuda_graph")
    logger.info("arguments: %s", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    info = run_info(args)  # warns now when the numbers are not comparable with the papers' protocol
    exp = build_experiment(args, device, ckpt, source)
    model, optimizer, scheduler, tasks = exp.model, exp.optimizer, exp.scheduler, exp.tasks
    if args.test_only:
        tasks = eval_splits(args, tasks)
    names = metric_names(exp.tasks)
    # a bad --best_metric stops here, before any step
    score_name = best_metric_name(names, args.best_metric, args.select_on) if not args.test_only else ""
    if ckpt is not None and not args.test_only:
        ckpt = restart_from_checkpoint(ckpt, source, model=model, optimizer=optimizer, scheduler=scheduler,
                                       num_iters=args.num_iters)  # from here on: the ResumeState train continues

    folder, created = "", False
    if args.resume:
        folder = os.path.dirname(os.path.abspath(args.resume))  # a resumed run continues in its folder
    elif rank == 0:
        name = None
        if args.test_only:  # an evaluation, named as one: eval_<time>_<checkpoint name><comment>
            stem = os.path.splitext(os.path.basename(args.model_checkpoint))[0]
            name = f"eval_{{time}}_{stem}{args.comment}"
        folder, created = run_folder(args, name), True
    if world > 1:  # the folder name holds the time: take rank 0's
        shared = [folder]
        torch.distributed.broadcast_object_list(shared, src=0)
        folder = shared[0]

    def score(metrics: dict) -> float:  # the selection score of an evaluation; NaN where it lacks the split
        if not any(k.startswith(f"{args.select_on} ") for k in metrics):
            return math.nan
        return best_score(metrics, args.best_metric, args.select_on)

    run = Run(args, folder, enabled=rank == 0, device=device, metric_names=names, created=created,
              score=None if args.test_only else score, score_name=score_name, early=early)
    run.info.update(info)
    try:
        logger.info("log files saved to %s", folder)
        if args.test_only:
            it = int(ckpt.get("it", 0))
            metrics = evaluate_all(args, model, tasks, device, run, it)
            run.started = True
            run.metrics(metrics, it)
            if args.submission_dir:
                import cirr_submission
                from factory import cirr_test1

                cirr_submission.write_test1_submission(args, model, cirr_test1(args), device)
            run.close(metrics, it)
            return 0
        if ckpt is not None:
            logger.info("resuming from %s at iteration %d", args.resume, ckpt["it"])
        step_model = model
        if world > 1:
            step_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        metrics = train(args, model, optimizer, scheduler, exp.trainset, tasks, run, device, ckpt, step_model)
        if args.select_on == "val":
            metrics = evaluate_best_on_test(args, model, tasks, exp.testset, run, device)
    except BaseException as exc:
        failed = (UserInputError, TrainingDiverged, WriteFailed, NonFiniteFeaturesError)
        run.abort(f"main.py: error: {exc}" if isinstance(exc, failed) else "")
        raise
    finally:
        run.release()
    if run.best is not None:
        logger.info("best %s: %.2f%% at iteration %d; run folder %s", run.best["metric"], 100 * run.best["value"],
                    run.best["it"], folder)
    else:
        logger.info("finished training; checkpoints and metrics.json in %s", folder)
    run.close(metrics, args.num_iters)
    return 0


def resume_command(argv: Sequence[str], checkpoint: str) -> str:
    """The command line ``argv`` with ``--resume checkpoint`` in place of any --resume it had."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--resume":
            skip = True
        elif not a.startswith("--resume="):
            rest.append(a)
    return shlex.join(["main.py", "--resume", checkpoint, *rest])


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=[TqdmLogHandler()])
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, given = parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (one line already printed)
        return int(exc.code or 0)
    try:
        return run_main(args, given)
    except UserInputError as exc:
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, WriteFailed, NonFiniteFeaturesError) as exc:  # a run that failed, not bad input
        print(f"main.py: error: {exc}", file=sys.stderr)
        return 1
    except Interrupted as exc:
        name = signal.Signals(exc.signum).name
        if exc.checkpoint:
            unsaved = "" if exc.saved else " (its weights are not finite: nothing saved)"
            print(f"main.py: {name}: interrupted at iteration {exc.it}{unsaved}; resume with: "
                  f"{resume_command(argv, exc.checkpoint)}", file=sys.stderr)
        else:
            print(f"main.py: {name}: interrupted at iteration {exc.it}; no finite checkpoint to resume from",
                  file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("main.py: interrupted; stopped without writing a checkpoint (any written before is intact)",
              file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
