"""The datasets of ``--dataset``, one ``DatasetSpec`` each, registered by name: every rule that depends on the
dataset (its splits, its validation split, its flag defaults, the flags that apply to it) is a field of its entry,
looked up by name, so no code outside this module tests a dataset's name.

The benchmarks are the ones of TIRG (Vo et al., CVPR 2019, arXiv 1812.07119, Sec. 4: MIT-States, Fashion200k,
CSS3D) and ComposeAE (Anwaar et al., WACV 2021, arXiv 2006.11149, Sec. 4.1: MIT-States, Fashion200k, Fashion IQ),
and CIRR (Liu et al., ICCV 2021); ``synthetic`` (the embedded default) and ``triplets`` (your own triplets.csv) use
the same protocols.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

from errors import UserInputError

from . import cirr, css3d, fashion200k, fashioniq, mitstates, synthetic, triplets
from .base import DEFAULT_IMAGE_SIZE, SplitOptions

SELECT_ON = ("test", "val")  # --select_on: the split that picks best_checkpoint.pth


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One ``--dataset`` choice and its rules."""

    name: str  # the --dataset value
    title: str  # its name in messages
    layout: str  # what --dataset_path holds
    protocols: tuple[str, ...]  # the RetrievalTask.protocol values of its tasks (test_retrieval.task_metrics)
    build: Callable[[SplitOptions], dict]  # SplitOptions -> {split: dataset}, the splits below
    splits: tuple[str, ...] = ("train", "test")  # the splits built with --select_on test
    # the splits built with --select_on val, and how; None: it has no validation split (--select_on val refused)
    val_splits: tuple[str, ...] | None = None
    val_rule: str = ""
    val_nouns: bool = False  # --val_nouns N holds out training nouns (the MIT-States layout) as the val split
    resnet_lr_scale: float = 0.1  # default --resnet_lr_scale (TIRG: 0.1x on photos, 1x on the CSS3D renders)
    # defaults of the flags not given, over the original's (config.ORIGINAL_DEFAULTS)
    preset: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))
    # --use_complete_text_query puts the target's label into the query of a paper benchmark: factory.run_info warns
    # that the recalls are not comparable with TIRG's protocol
    complete_query_warning: bool = False
    records_fashioniq_protocol: bool = False  # metrics.json records --fashioniq_protocol
    # the split whose predictions --submission_dir writes for a test server (SplitOptions -> dataset); None: the
    # flag does not apply
    submission: Callable[[SplitOptions], Any] | None = None
    # what --eval_every 0 means (training.stages_due): 'epochs_1_4_7', the original's evaluations after epochs 1, 4,
    # 7, ...; 'eight_per_run', 8 evaluations spread evenly over --num_iters (datasets of a few epochs' worth)
    eval_schedule: str = "epochs_1_4_7"
    # (min, max) final test recall_top1_correct_composition of the preset's run over seeds 0, 1, 2, as fractions,
    # printed with the yardstick line at the end of a run (runlog.Run.yardstick); None: not measured
    reference_recall_at_1: tuple[float, float] | None = None

    def split_names(self, select_on: str) -> tuple[str, ...]:
        """The splits ``build`` returns with ``--select_on select_on`` (refused where there is no val split)."""
        if select_on != "val":
            return self.splits
        if self.val_splits is None:
            raise UserInputError(f"--select_on val: {self.name} has no validation split (only train and test); pass "
                                 f"--select_on test")
        return self.val_splits


_MIT_LAYOUT = mitstates.MITStates._layout()
_MIT_VAL = "--val_nouns N training nouns held out (seeded); test = the 49 test nouns"

DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Adds ``spec`` under its name (one entry per name)."""
    if spec.name in DATASETS:
        raise ValueError(f"dataset {spec.name!r} is registered twice")
    DATASETS[spec.name] = spec
    return spec


register(DatasetSpec(
    "mitstates", "MIT-States", _MIT_LAYOUT, ("tirg",), mitstates.build_splits,
    val_splits=("train", "test", "val"), val_rule=_MIT_VAL, val_nouns=True, complete_query_warning=True))
register(DatasetSpec(
    "fashion200k", "Fashion200k", fashion200k.Fashion200k._layout(), ("tirg",), fashion200k.build_splits,
    complete_query_warning=True))
register(DatasetSpec(
    "fashionIQ", "Fashion IQ", fashioniq.FashionIQ._layout(), ("tirg", "fashioniq_standard"), fashioniq.build_splits,
    val_splits=("train", "val", "test"), records_fashioniq_protocol=True,
    val_rule="val, with test = the 'test' split, which needs targets in cap.<cat>.test.json"))
register(DatasetSpec(
    "synthetic", "synthetic", f"generated on first use, in the MIT-States layout {_MIT_LAYOUT}", ("tirg",),
    synthetic.build_splits, val_splits=("train", "test", "val"), val_rule=_MIT_VAL, val_nouns=True,
    # the ResNet body is trained from scratch (image_weights none): at the full rate, as TIRG trains on CSS3D
    resnet_lr_scale=1.0,
    # the embedded default: a first run of about 2 minutes on a 2-core CPU with no download (images at 32 px,
    # evaluated at the middle and the end, one checkpoint at the end)
    preset=types.MappingProxyType(dict(
        dataset_path="data/synthetic", use_bert=True, bert_model="all-MiniLM-L6-v2", loss="batch_based_classification",
        num_iters=300, learning_rate_decay_frequency=200, loader_num_workers=0, image_size=32,
        image_weights="none", train_eval_queries=200, eval_every=150, save_every=300, use_complete_text_query=False,
        weight_decay=5e-5, threads=1,  # one thread, as measured below (several threads sum in another order)
    )),
    eval_schedule="eight_per_run",
    # `python main.py --seed N` for N = 0, 1, 2 (OMP_NUM_THREADS=1): final test R@1 0.5225, 0.4892, 0.46
    reference_recall_at_1=(0.46, 0.5225)))
register(DatasetSpec(
    "triplets", "triplets", triplets.Triplets._layout(), ("tirg",), triplets.build_splits,
    val_splits=("train", "test", "val"), val_rule="its val rows, with test = its test rows (both needed)",
    eval_schedule="eight_per_run"))
register(DatasetSpec(
    "css3d", "CSS3D", css3d.CSS3D._layout(), ("tirg",), css3d.build_splits, resnet_lr_scale=1.0))
register(DatasetSpec(
    "cirr", "CIRR", cirr.CIRR._layout(), ("cirr",), cirr.build_splits,
    val_splits=("train", "val", "test"), submission=cirr.test1_split,
    val_rule="val, with test = test1, which only the CIRR server scores (--submission_dir)",
    eval_schedule="eight_per_run"))

DATASET_NAMES = tuple(DATASETS)  # the --dataset choices, in registration order


def dataset_spec(name: str) -> DatasetSpec:
    """The entry of ``--dataset name``; an unknown name is a UserInputError."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UserInputError(f"unknown dataset {name!r}: use one of {', '.join(DATASET_NAMES)}") from None


def build_splits(name: str, path: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, category: str = "all", seed: int = 0,
                 image_cache: str | None = None, exclude_source_adj: bool = False,
                 fashioniq_protocol: str = "composeae", select_on: str = "test", val_nouns: int = 0) -> dict:
    """``{'train', 'test'[, 'val']}`` datasets for ``--dataset name`` (its ``DatasetSpec.build``).

    ``select_on='test'`` (the original codes' selection): train and test only. ``select_on='val'``: also a
    validation split that picks the checkpoint, while 'test' is evaluated once at the end, as the entry's
    ``val_rule`` says; a dataset without one (Fashion200k, CSS3D) is refused.
    """
    if select_on not in SELECT_ON:
        raise UserInputError(f"--select_on {select_on!r}: use test or val")
    spec = DATASETS.get(name)
    if val_nouns and (spec is None or not spec.val_nouns or select_on != "val"):
        raise UserInputError("--val_nouns N holds out MIT-States training nouns for --select_on val; use it with "
                             "--dataset mitstates (or synthetic) and --select_on val")
    spec = dataset_spec(name)
    spec.split_names(select_on)  # refuses --select_on val without a validation split
    return spec.build(SplitOptions(
        path, image_size=image_size, use_complete_text_query=use_complete_text_query, category=category, seed=seed,
        image_cache=image_cache, exclude_source_adj=exclude_source_adj, fashioniq_protocol=fashioniq_protocol,
        select_on=select_on, val_nouns=val_nouns))


def build_datasets(name: str, path: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                   use_complete_text_query: bool = False, category: str = "all", seed: int = 0,
                   image_cache: str | None = None, exclude_source_adj: bool = False,
                   fashioniq_protocol: str = "composeae") -> tuple[Any, Any]:
    """``(trainset, testset)`` for ``--dataset name``; Fashion IQ tests on its 'val' split, as the original, and
    CIRR on its 'val' split (test1's targets are not public)."""
    splits = build_splits(name, path, image_size=image_size, use_complete_text_query=use_complete_text_query,
                          category=category, seed=seed, image_cache=image_cache,
                          exclude_source_adj=exclude_source_adj, fashioniq_protocol=fashioniq_protocol)
    return splits["train"], splits["test"]
