"""The one home of the wiring: the device, the process group, the model with its text encoder and the original's
optimizer, placed on the device with the speed options. ``main.py``, ``benchmark.py`` and the tests build
through these functions."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Sequence

import torch

import config
import img_text_composition_models as models
import text_model
from checkpoint import read_checkpoint
from checkpoint_settings import recorded_settings, validate_checkpoint_settings
from errors import UserInputError
from distributed import convert_to_global_batchnorm, distributed_world
from retrieval_datasets.base import SplitOptions
from retrieval_datasets.registry import build_splits as build_dataset_splits, dataset_spec
from retrieval_datasets.synthetic import SYNTHETIC_MANIFEST

logger = logging.getLogger("main")


def create_model_and_optimizer(args, texts: Sequence[str], vocab: dict | None = None):
    """The model and the original's SGD: ``img_model.fc`` at the learning rate, the rest of the ResNet at
    ``--resnet_lr_scale`` (0.1x; 1x on CSS3D, as TIRG), everything else at 1x; momentum 0.9; the rate x0.1 every --learning_rate_decay_frequency iterations."""
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
    groups = [{"params": fc, "lr": lr}, {"params": body, "lr": args.resnet_lr_scale * lr}, {"params": rest, "lr": lr}]
    # fused=None lets PyTorch pick its fastest implementation (foreach on CUDA); the math is plain SGD either way
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    freq = args.learning_rate_decay_frequency
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: 0.1 ** (it // freq))
    return model, optimizer, scheduler


def place_model(args, model, device: torch.device):
    """Moves the model to ``device`` with the speed options: channels_last ResNet, torch.compile (opt-in),
    cuDNN autotuning, TF32 or fp32 cuDNN (also used by benchmark.py)."""
    model.to(device)
    if args.channels_last:
        model.img_model.to(memory_format=torch.channels_last)
    if args.compile:
        model.img_model.compile()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        precision = "tf32" if args.allow_tf32 else "ieee"  # ieee = fp32 convolutions, as the original ran them
        torch.backends.cudnn.conv.fp32_precision = precision
        torch.backends.cudnn.rnn.fp32_precision = precision
    return model



def build_splits(args) -> dict:
    """``{'train', 'test'[, 'val']}`` datasets of ``--dataset`` under ``--dataset_path`` with the run's image
    settings (a 'val' split with ``--select_on val``): the build of its registry entry
    (``retrieval_datasets.registry.build_splits``)."""
    return build_dataset_splits(
        args.dataset, args.dataset_path, image_size=args.image_size, use_complete_text_query=args.use_complete_text_query,
        category=args.category_to_train, seed=args.seed, image_cache=args.image_cache or None,
        exclude_source_adj=args.exclude_source_adj, fashioniq_protocol=getattr(args, "fashioniq_protocol", "composeae"),
        select_on=getattr(args, "select_on", "test"), val_nouns=getattr(args, "val_nouns", 0))


def build_datasets(args) -> tuple:
    """``(trainset, testset)`` of ``--dataset`` under ``--dataset_path`` with the run's image settings."""
    splits = build_splits(args)
    return splits["train"], splits["test"]


def cirr_test1(args):
    """CIRR's test1 split with the run's image settings (no public targets: for the server's files): the
    ``submission`` split of the dataset's registry entry."""
    spec = dataset_spec(args.dataset)
    if spec.submission is None:
        raise UserInputError(f"--submission_dir writes CIRR test1 predictions; --dataset is {args.dataset}")
    return spec.submission(SplitOptions(args.dataset_path, image_size=args.image_size, seed=args.seed,
                                        image_cache=args.image_cache or None))


def build_tasks(args, trainset, testset, valset=None) -> dict:
    """The fixed retrieval benchmarks, ``{split: (dataset, RetrievalTask)}``: a seeded sample of
    ``--train_eval_queries`` training queries, the validation split's queries (``--select_on val``) and the test
    split's queries (left out where the test split has no public targets: CIRR's test1, scored by its server)."""
    tasks = {"train": (trainset, trainset.train_task(args.train_eval_queries, args.seed))}
    if valset is not None:
        tasks["val"] = (valset, valset.test_task())
    if getattr(testset, "labelled", True):
        tasks["test"] = (testset, testset.test_task())
    return tasks


COMPLETE_QUERY_TEXT = "complete (holds the target label)"


def run_info(args) -> dict:
    """What metrics.json records beside the numbers, to say what they are comparable with; warns (once, at the
    start) when the query text holds the target's label."""
    spec = dataset_spec(args.dataset)
    info = {"dataset": args.dataset, "select_on": getattr(args, "select_on", "test")}
    if spec.records_fashioniq_protocol:
        info["fashioniq_protocol"] = getattr(args, "fashioniq_protocol", "composeae")
    if args.use_complete_text_query and spec.complete_query_warning:
        logger.warning("--use_complete_text_query True: the query text holds the target's label (on %s the whole "
                       "target caption), so these recalls are not comparable with TIRG's protocol", args.dataset)
        info["query_text"] = COMPLETE_QUERY_TEXT
    path = str(getattr(args, "dataset_path", "") or "")
    # images drawn by the synthetic generator (in a dataset's layout) are no benchmark's: report.py says so
    info["synthetic_data"] = os.path.isfile(os.path.join(path, SYNTHETIC_MANIFEST)) if path else False
    return info


def load_weights(model, ckpt: dict, source: str) -> None:
    """Loads ``ckpt['model_state_dict']`` into ``model`` (this project's checkpoints and the original code's); a
    checkpoint that does not fit is refused naming the settings it was trained with."""
    if model.text_model is not None and ckpt.get("vocab") is None:
        kind = "the original code's checkpoints hold none" if "format" not in ckpt else "it was saved without one"
        logger.warning("%s holds no LSTM vocabulary (%s): it is rebuilt from the training texts in sorted-listing "
                       "order, but the original numbered words in its machine's os.listdir order, so its word "
                       "embeddings may be matched to the wrong words", source, kind)
    try:
        models.load_model_state(model, ckpt["model_state_dict"], source)
    except UserInputError as exc:
        saved = config.checkpoint_args(ckpt)
        trained = " ".join(f"--{k} {getattr(saved, k)}" for k in MODEL_SHAPE_SETTINGS)
        raise UserInputError(f"{exc}; the checkpoint was trained with {trained}") from None


# The settings that decide the shapes of a model's weights (named when a checkpoint does not fit).
MODEL_SHAPE_SETTINGS = ("model", "use_bert", "bert_model", "image_embed_dim", "lstm_dim")


@dataclasses.dataclass
class Experiment:
    """Everything a training or evaluation run works on, built from the args by ``build_experiment``."""

    trainset: Any
    testset: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tasks: dict  # {split: (dataset, RetrievalTask)}
    valset: Any = None  # --select_on val: the split that picks best_checkpoint.pth

    def splits(self) -> dict:
        """``{'train', 'test'[, 'val']}``: the datasets as built (``completeness.DataRecord``, ``fingerprint``)."""
        splits = {"train": self.trainset, "test": self.testset}
        return splits if self.valset is None else {**splits, "val": self.valset}


def build_model(args, device: torch.device, texts: Sequence[str] = (), ckpt: dict | None = None,
                source: str = "") -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """``(model, optimizer, scheduler)`` for ``args`` on ``device``, with the weights of ``ckpt`` when given (then
    no ImageNet weights are fetched: the checkpoint holds the ResNet's).

    Seeding, in order: ``--seed`` for the initial weights (the same on every process), ``--seed`` for the
    soft-triplet sampler (all processes draw the same triplets of the global batch), then ``--seed + rank`` for
    dropout (different on each process).
    """
    rank, _ = distributed_world()
    if ckpt is not None:
        args = argparse.Namespace(**{**vars(args), "image_weights": "none"})
    torch.manual_seed(args.seed)  # identical initial weights on every process
    model, optimizer, scheduler = create_model_and_optimizer(args, texts, ckpt.get("vocab") if ckpt else None)
    if ckpt is not None:
        load_weights(model, ckpt, source)
    model.loss_generator = torch.Generator(device).manual_seed(args.seed)
    torch.manual_seed(args.seed + rank)  # dropout differs between processes
    place_model(args, model, device)
    return model, optimizer, scheduler


def build_experiment(args, device: torch.device, ckpt: dict | None = None, source: str = "") -> Experiment:
    """Datasets (``build_splits``), model, optimizer and schedule (``build_model``, weights from ``ckpt`` when
    given) and the retrieval tasks (``build_tasks``) for ``args``."""
    splits = build_splits(args)
    trainset, testset, valset = splits["train"], splits["test"], splits.get("val")
    logger.info("trainset size: %d, testset size: %d%s", len(trainset), len(testset),
                f", valset size: {len(valset)}" if valset is not None else "")
    model, optimizer, scheduler = build_model(args, device, trainset.get_all_texts(), ckpt, source)
    return Experiment(trainset, testset, model, optimizer, scheduler, build_tasks(args, trainset, testset, valset),
                      valset)


def read_model_checkpoint(path: str) -> dict:
    """The checkpoint at ``path`` to build a model from: read and checked (``checkpoint.read_checkpoint``), its
    settings that size the model checked too (``checkpoint_settings.validate_checkpoint_settings``); a bad file is
    one UserInputError naming it and the field."""
    ckpt = read_checkpoint(path)
    validate_checkpoint_settings(recorded_settings(ckpt), path)
    return ckpt


def model_from_checkpoint(path: str, device: torch.device, *, bert_model: str | None = None,
                          texts: Sequence[str] = (), ckpt: dict | None = None) -> tuple[torch.nn.Module, Any, dict]:
    """``(model, args, ckpt)``: the model a checkpoint describes, built from the checkpoint's own settings
    (``config.checkpoint_args``, as --test_only and --resume take them) by ``build_model``, with its weights, on
    ``device``, in eval mode.

    The checkpoint is read and checked by ``read_model_checkpoint``, unless ``ckpt`` is what that function returned
    for ``path`` already (so that a caller that checks it early reads the file once). Every weight comes from the
    checkpoint, so no ImageNet weights are fetched, and BERT only for a BERT model: from the checkpoint's
    ``--bert_model`` unless ``bert_model`` names another place for it. An LSTM checkpoint of the original code holds
    no vocabulary: ``texts`` (the training texts) rebuild it.
    """
    if ckpt is None:
        ckpt = read_model_checkpoint(path)
    args = config.checkpoint_args(ckpt)
    if bert_model:
        args.bert_model = bert_model
    args.compile = False  # an evaluation tool: not worth torch.compile's warm-up
    if not args.use_bert and ckpt.get("vocab") is None and not texts:
        kind = "as the original code's" if "format" not in ckpt else "saved without one"
        raise UserInputError(f"{path} is an LSTM checkpoint without a vocabulary ({kind}); pass the training texts "
                             f"of its dataset to rebuild it")
    model, _, _ = build_model(args, device, texts, ckpt, path)
    model.eval()
    return model, args, ckpt
