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
import os
import sys
from typing import Sequence

import torch

import img_text_composition_models as models
from checkpoint import read_checkpoint, set_rng_state
from factory import build_experiment, init_distributed
from runlog import Run, run_folder
from torch_functions import LOSS_NAMES, UserInputError, distributed_world
from training import TrainingDiverged, evaluate_all, train

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
    p.add_argument("--dataset", type=str, default="synthetic", choices=["mitstates", "fashion200k", "fashionIQ", "synthetic", "triplets"],
                   help="dataset, in its published layout under --dataset_path; triplets = your own DIR/triplets.csv (source,text,target,split)")
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
    args.dataset = dataset if dataset in datasets_names() else "mitstates"
    for key, value in known.items():
        setattr(args, key, value)
    if args.dataset_path is None:
        args.dataset_path = ""
    for key, value in ORIGINAL_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def datasets_names() -> tuple[str, ...]:
    return tuple(next(a for a in get_args_parser()._actions if a.dest == "dataset").choices)


def run_main(args: argparse.Namespace) -> int:
    device = init_distributed(args)
    rank, world = distributed_world()
    if args.cuda_graph and (device.type != "cuda" or world > 1) and not args.test_only:
        raise UserInputError(f"--cuda_graph True needs one process on a CUDA device (here: {device.type}, "
                             f"{world} process{'es' if world > 1 else ''}); drop --cuda_graph")
    logger.info("arguments: %s", " ".join(f"{k}={v}" for k, v in vars(args).items()))
    source = args.model_checkpoint if args.test_only else args.resume
    ckpt = read_checkpoint(source) if source else None
    exp = build_experiment(args, device, ckpt, source)
    model, optimizer, scheduler, tasks = exp.model, exp.optimizer, exp.scheduler, exp.tasks

    folder = os.path.dirname(os.path.abspath(args.resume)) if args.resume else (run_folder(args) if rank == 0 else "")
    if world > 1:  # the folder name holds the time: take rank 0's
        names = [folder]
        torch.distributed.broadcast_object_list(names, src=0)
        folder = names[0]
    run = Run(args, folder, enabled=rank == 0)
    logger.info("log files saved to %s", folder)
    if args.test_only:
        metrics = evaluate_all(args, model, tasks, device, run, int(ckpt.get("it", 0)))
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
        metrics = train(args, model, optimizer, scheduler, exp.trainset, tasks, run, device, start, step_model)
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
