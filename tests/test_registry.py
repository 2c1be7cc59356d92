"""The dataset registry (retrieval_datasets.registry): its names are the --dataset choices, the flag defaults that
depend on the dataset come from its entries, each entry builds the splits it declares, and no module outside it
and the tests compares against a dataset's name."""
from __future__ import annotations

import ast
import csv
import dataclasses
import importlib.util
import os
import shutil

import pytest

import config
import synthetic
from errors import UserInputError
from retrieval_datasets import registry
from retrieval_datasets import synthetic as synthetic_module
from retrieval_datasets.base import SplitOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16


def parse(*flags: str):
    return config.parse_args(list(flags))[0]


def _test_module(name: str):
    """A sibling test module, loaded from its file for its data writers (test modules are not importable by name
    under --import-mode=importlib)."""
    spec = importlib.util.spec_from_file_location(f"_registry_{name}", os.path.join(ROOT, "tests", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------------------
def test_registered_names_are_the_dataset_choices():
    (action,) = [a for a in config.get_args_parser()._actions if a.dest == "dataset"]
    assert tuple(action.choices) == registry.DATASET_NAMES == tuple(registry.DATASETS)
    assert registry.DATASET_NAMES == ("mitstates", "fashion200k", "fashionIQ", "synthetic", "triplets", "css3d", "cirr")
    assert all(spec.name == name for name, spec in registry.DATASETS.items())
    for name in registry.DATASET_NAMES:  # every registered name parses as --dataset, and nothing else does
        assert parse("--dataset", name).dataset == name
    with pytest.raises(SystemExit):
        parse("--dataset", "cifar")
    with pytest.raises(UserInputError, match="unknown dataset 'cifar': use one of mitstates, fashion200k"):
        registry.dataset_spec("cifar")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(registry.DATASETS["cirr"])


def test_resnet_lr_scale_default_comes_from_the_registry(monkeypatch):
    for name in registry.DATASET_NAMES:
        args = config.resolve_defaults(parse("--dataset", name, "--dataset_path", "x"))
        assert args.resnet_lr_scale == (1.0 if name in ("css3d", "synthetic") else 0.1), name
        assert args.resnet_lr_scale == config.default_resnet_lr_scale(name)
        assert config.resolve_defaults(parse("--dataset", name, "--dataset_path", "x", "--resnet_lr_scale", "0.3")
                                       ).resnet_lr_scale == 0.3  # a given value wins
        # a checkpoint that does not record it (the original code's) takes its dataset's entry too
        assert config.checkpoint_args({"args": {"dataset": name}}).resnet_lr_scale == args.resnet_lr_scale
    monkeypatch.setitem(registry.DATASETS, "fashion200k",
                        dataclasses.replace(registry.DATASETS["fashion200k"], resnet_lr_scale=0.25))
    assert config.resolve_defaults(parse("--dataset", "fashion200k", "--dataset_path", "x")).resnet_lr_scale == 0.25


def test_the_synthetic_preset_applies_only_to_synthetic():
    preset = registry.dataset_spec("synthetic").preset
    assert preset is config.SYNTHETIC_PRESET and preset["image_size"] == 32 and preset["num_iters"] == 300
    assert [n for n, s in registry.DATASETS.items() if s.preset] == ["synthetic"]
    for name in registry.DATASET_NAMES:
        args = config.resolve_defaults(parse("--dataset", name, "--dataset_path", "x"))
        for key, value in preset.items():
            expected = "x" if key == "dataset_path" else value if name == "synthetic" else config.ORIGINAL_DEFAULTS[key]
            assert getattr(args, key) == expected, (name, key)
    assert config.resolve_defaults(parse()).dataset_path == "data/synthetic"  # the embedded default needs no path
    with pytest.raises(UserInputError, match="--dataset mitstates needs --dataset_path"):
        config.resolve_defaults(parse("--dataset", "mitstates"))


def test_flags_that_apply_to_some_datasets_follow_their_entries():
    with_submission = [n for n, s in registry.DATASETS.items() if s.submission is not None]
    assert with_submission == ["cirr"]
    for name in registry.DATASET_NAMES:
        flags = ("--dataset", name, "--dataset_path", "x", "--test_only", "--model_checkpoint", "c.pth",
                 "--submission_dir", "out")
        if name in with_submission:
            assert config.resolve_defaults(parse(*flags)).submission_dir == "out"
        else:
            with pytest.raises(UserInputError, match=f"--submission_dir writes CIRR test1 predictions; --dataset is "
                                                     f"{name}"):
                config.resolve_defaults(parse(*flags))
    with pytest.raises(UserInputError, match="only the CIRR server scores"):
        config.resolve_defaults(parse("--dataset", "cirr", "--dataset_path", "x", "--select_on", "val"))
    assert [n for n, s in registry.DATASETS.items() if s.val_nouns] == ["mitstates", "synthetic"]
    assert [n for n, s in registry.DATASETS.items() if s.records_fashioniq_protocol] == ["fashionIQ"]
    assert [n for n, s in registry.DATASETS.items() if s.complete_query_warning] == ["mitstates", "fashion200k"]
    assert [n for n, s in registry.DATASETS.items() if s.val_splits is None] == ["fashion200k", "css3d"]


# ------------------------------------------------------------------------------------------------------------------
# Each entry builds its declared splits, on the tiny sets of the other test modules
@pytest.fixture(scope="module")
def dataset_paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("registry")
    data, css, cirr = _test_module("test_datasets"), _test_module("test_css3d"), _test_module("test_cirr")
    fiq = data.make_fashioniq(root / "fashionIQ")
    for category in data.FIQ_VAL:  # a labelled test split, a copy of val (--select_on val needs one)
        for sub, prefix in (("captions", "cap"), ("image_splits", "split")):
            val = os.path.join(fiq, sub, f"{prefix}.{category}.val.json")
            shutil.copy(val, val.replace(".val.json", ".test.json"))
    triplets = synthetic.write_triplets_csv(str(root / "triplets"), seed=0, image_size=S, n_train_nouns=2,
                                            n_test_nouns=2, adjectives_per_noun=2, images_per_class=2)
    with open(triplets, newline="") as f:
        rows = list(csv.DictReader(f))
    tests = [r for r in rows if r["split"] == "test"]
    for r in tests[: len(tests) // 2]:  # val rows beside the test rows
        r["split"] = "val"
    with open(triplets, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return {"mitstates": data.make_mitstates(root / "mitstates"), "fashion200k": data.make_fashion200k(root / "f200k"),
            "fashionIQ": fiq, "synthetic": str(root / "synthetic"), "triplets": os.path.dirname(triplets),
            "css3d": css.make_css(root / "css3d"), "cirr": cirr.make_cirr(root / "cirr")}


@pytest.mark.parametrize("select_on", registry.SELECT_ON)
@pytest.mark.parametrize("name", registry.DATASET_NAMES)
def test_each_entry_builds_the_splits_it_declares(name, select_on, dataset_paths, monkeypatch):
    generate = synthetic_module.generate_synthetic
    monkeypatch.setattr(synthetic_module, "generate_synthetic",  # the synthetic entry's build, at a tiny size
                        lambda path, seed: generate(path, seed=seed, image_size=S, n_train_nouns=3, n_test_nouns=1,
                                                    adjectives_per_noun=3, images_per_class=2))
    spec = registry.dataset_spec(name)
    val_nouns = 1 if spec.val_nouns and select_on == "val" else 0
    build = dict(image_size=S, select_on=select_on, val_nouns=val_nouns)
    if select_on == "val" and spec.val_splits is None:
        with pytest.raises(UserInputError, match=f"--select_on val: {name} has no validation split"):
            registry.build_splits(name, dataset_paths[name], **build)
        return
    splits = registry.build_splits(name, dataset_paths[name], **build)
    assert tuple(splits) == spec.split_names(select_on) == (spec.splits if select_on == "test" else spec.val_splits)
    for split, dataset in splits.items():
        assert len(dataset) > 0 and dataset.test_task().protocol in spec.protocols, (name, split)
    assert splits["train"].split == "train"
    if spec.val_nouns:
        with pytest.raises(UserInputError, match=f"--select_on val on {name}: pass --val_nouns N"):
            registry.build_splits(name, dataset_paths[name], image_size=S, select_on="val")
    else:
        with pytest.raises(UserInputError, match="--val_nouns N holds out MIT-States training nouns"):
            registry.build_splits(name, dataset_paths[name], image_size=S, select_on="val", val_nouns=1)
    if spec.submission is not None:
        test1 = spec.submission(SplitOptions(dataset_paths[name], image_size=S))
        assert test1.split == "test1" and not test1.labelled


# ------------------------------------------------------------------------------------------------------------------
def _name_comparisons(source: str) -> list[int]:
    """Lines of ``source`` that compare (==, !=, in, not in) against a dataset name literal; a comparison with a
    RetrievalTask's ``.protocol`` is not one ('cirr' also names CIRR's evaluation protocol)."""
    names = set(registry.DATASET_NAMES)
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or not any(
                isinstance(o, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for o in node.ops):
            continue
        operands = [node.left, *node.comparators]
        if any(isinstance(o, ast.Attribute) and o.attr == "protocol" for o in operands):
            continue
        elements = [e for o in operands for e in (o.elts if isinstance(o, (ast.Tuple, ast.List, ast.Set)) else [o])]
        if any(isinstance(e, ast.Constant) and e.value in names for e in elements):
            lines.append(node.lineno)
    return lines


def test_no_module_outside_the_registry_compares_dataset_names():
    assert _name_comparisons("if args.dataset == 'css3d': pass\nx = d in ('mitstates', 'cirr')") == [1, 2]
    assert _name_comparisons("if task.protocol == 'cirr': pass\nx = 'css3d'") == []
    found = {}
    for folder, subs, files in os.walk(ROOT):
        subs[:] = [s for s in subs if not s.startswith(".") and s not in ("tests", "venv", "data", "logs", "__pycache__")]
        for file_name in files:
            path = os.path.join(folder, file_name)
            if file_name.endswith(".py") and os.path.realpath(path) != os.path.realpath(registry.__file__):
                with open(path, encoding="utf-8") as f:
                    lines = _name_comparisons(f.read())
                if lines:
                    found[os.path.relpath(path, ROOT)] = lines
    assert found == {}
