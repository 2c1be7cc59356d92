"""What a run leaves in its folder and on the console: args.json, out.log, grouped TensorBoard tags with one args
card, hparams and a custom-scalars layout, metrics.json's best, the summary table; no folder after a failed start;
the command line's groups and bare booleans."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest
import torch

import checkpoint
import config
import runlog

METRIC_LINE = re.compile(r"^     (train|test) recall_top\d+_correct_\w+ \d+(\.\d+)?$")


def execution_flags(log_dir) -> list[str]:
    return ["--device", "cpu", "--loader_num_workers", "0", "--log_dir", str(log_dir)]


def raw_events(folder: str) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    (path,) = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    return list(EventFileLoader(path).Load())


def summary_values(folder: str) -> list:
    return [v for e in raw_events(folder) if e.HasField("summary") for v in e.summary.value]


def scalar(value) -> float:
    return value.simple_value if value.HasField("simple_value") else value.tensor.float_val[0]


# ------------------------------------------------------------------------------------------------------------------
# The run folder
def test_args_json_holds_every_resolved_setting_and_the_environment(tirg_lstm_run):
    with open(os.path.join(tirg_lstm_run["folder"], "args.json")) as f:
        info = json.load(f)
    saved = checkpoint.read_checkpoint(os.path.join(tirg_lstm_run["folder"], "latest_checkpoint.pth"))["args"]
    assert info["args"] == json.loads(json.dumps(saved))  # every resolved flag, as the checkpoint holds them
    assert set(info["args"]) == {a.dest for a in config.get_args_parser()._actions if a.dest != "help"}
    assert info["args"]["loader_num_workers"] == 0 and info["args"]["log_dir"] == tirg_lstm_run["log_dir"]
    assert info["torch"] == torch.__version__ and info["device"] == "cpu"
    assert "git_commit" in info and (info["git_commit"] is None or re.match(r"^[0-9a-f]{40}", info["git_commit"]))


def test_out_log_holds_the_console_without_progress_bars(tirg_lstm_run):
    with open(os.path.join(tirg_lstm_run["folder"], "out.log")) as f:
        log = f.read()
    printed = [line for line in tirg_lstm_run["stdout"].splitlines() if METRIC_LINE.match(line)]
    assert len(printed) == 30
    assert [line for line in log.splitlines() if METRIC_LINE.match(line)] == printed
    assert "\r" not in log and "it/s" not in log
    assert "INFO main: arguments: " in log  # logged before the folder existed: kept for out.log
    assert "INFO main: best test recall_top1_correct_composition" in log
    assert "iteration 4" in log and "best so far:" in log  # the summary table


def test_metrics_json_and_the_summary_table_give_the_best(tirg_lstm_run):
    with open(os.path.join(tirg_lstm_run["folder"], "metrics.json")) as f:
        metrics = json.load(f)
    r1 = metrics["latest"]["test recall_top1_correct_composition"]
    assert metrics["best"] == {"metric": "test recall_top1_correct_composition", "value": r1, "it": 4}
    out = tirg_lstm_run["stdout"].splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("iteration 4"))
    # the galleries hold 9 test and 8 train images: recall@10 and @50 would be 100% by construction, left out
    assert out[header].split()[2:] == ["R@1", "R@5", "(%)"]
    rows = {" ".join(line.split()[:2]): line.split()[2:] for line in out[header + 1: header + 7]}
    assert set(rows) == {f"{s} {v}" for s in ("train", "test") for v in ("composition", "adj", "noun")}
    latest = metrics["latest"]
    assert rows["test adj"] == [f"{100 * latest[f'test recall_top{k}_correct_adj']:.2f}" for k in (1, 5)]
    assert out[header + 7] == f"best so far: test recall_top1_correct_composition {100 * r1:.2f}% at iteration 4"
    final = [line for line in tirg_lstm_run["stderr"].splitlines() if "best test recall_top1" in line]
    assert len(final) == 1 and f"{100 * r1:.2f}% at iteration 4" in final[0] and tirg_lstm_run["folder"] in final[0]


def test_best_checkpoint_holds_what_evaluation_needs(tirg_lstm_run):
    best = checkpoint.read_checkpoint(os.path.join(tirg_lstm_run["folder"], "best_checkpoint.pth"))
    latest = checkpoint.read_checkpoint(os.path.join(tirg_lstm_run["folder"], "latest_checkpoint.pth"))
    assert not {"optimizer", "scheduler", "rng"} & set(best)
    assert {"optimizer", "scheduler", "rng"} <= set(latest)
    assert best["vocab"] == latest["vocab"] and best["args"] == latest["args"] and best["it"] == 4


def test_test_only_of_the_best_checkpoint_writes_an_evaluation_folder(tirg_lstm_run, run_main_cli, tmp_path):
    best = os.path.join(tirg_lstm_run["folder"], "best_checkpoint.pth")
    rc, out, err = run_main_cli(["--dataset", "mitstates", "--dataset_path", tirg_lstm_run["data"], "--test_only",
                                 "--model_checkpoint", best, *execution_flags(tmp_path)])
    assert rc == 0, err
    expected = [line for line in tirg_lstm_run["stdout"].splitlines() if METRIC_LINE.match(line) and " test " in line]
    assert [line for line in out.splitlines() if METRIC_LINE.match(line)] == expected
    (folder,) = os.listdir(tmp_path)
    assert re.fullmatch(r"eval_[A-Z][a-z]{2}\d{2}_\d{2}-\d{2}-\d{2}_best_checkpoint", folder), folder
    with open(tmp_path / folder / "metrics.json") as f:
        latest = json.load(f)["latest"]
    assert latest["it"] == 4 and not [k for k in latest if k.startswith("train ")]
    assert {"args.json", "out.log"} <= set(os.listdir(tmp_path / folder))


# ------------------------------------------------------------------------------------------------------------------
# TensorBoard
def test_events_hold_grouped_tags_one_args_card_and_the_custom_layout(tirg_lstm_run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    values = summary_values(tirg_lstm_run["folder"])
    scalars = {v.tag for v in values if v.HasField("simple_value") or v.metadata.plugin_data.plugin_name == "scalars"}
    assert {"loss/soft_triplet", "loss/total training loss", "lr", "test/recall_top1_correct_composition",
            "train/recall_top10_correct_noun"} <= scalars
    assert not [t for t in scalars if " recall" in t or t == "learning_rate"]
    texts = [v for v in values if v.metadata.plugin_data.plugin_name == "text"]
    assert [v.tag for v in texts] == ["args/text_summary"]
    (layout_value,) = [v for v in values if v.tag == "custom_scalars__config__"]
    layout = layout_pb2.Layout.FromString(layout_value.tensor.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert charts["R@1"] == ["train/recall_top1_correct_composition", "test/recall_top1_correct_composition"]
    assert charts["R@10"] == ["train/recall_top10_correct_composition", "test/recall_top10_correct_composition"]
    assert all(tag in scalars for tag in charts["R@1"] + charts["R@10"])


def test_hparams_put_the_main_settings_first_and_the_test_recalls_as_metrics(tirg_lstm_run):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    values = summary_values(tirg_lstm_run["folder"])
    (exp,) = [v for v in values if v.tag == "_hparams_/experiment"]
    data = plugin_data_pb2.HParamsPluginData.FromString(exp.metadata.plugin_data.content)
    infos = {h.name: h for h in data.experiment.hparam_infos}
    names = list(infos)
    assert names[:7] == ["model", "dataset", "loss", "text_encoder", "learning_rate", "batch_size", "seed"]
    assert "f" not in names and {"weight_decay", "num_iters", "amp"} <= set(names)
    assert [v.bool_value for v in infos["amp"].domain_discrete.values] == [False, True]  # shown as false / true
    assert infos["amp"].type == api_pb2.DATA_TYPE_BOOL
    metric_tags = [m.name.tag for m in data.experiment.metric_infos]
    assert metric_tags == ["session/test_R@1_final", "session/test_R@1_best", "session/test_R@10_final",
                           "session/test_R@10_best"]
    with open(os.path.join(tirg_lstm_run["folder"], "metrics.json")) as f:
        latest = json.load(f)["latest"]
    logged = {v.tag: scalar(v) for v in values if v.tag.startswith("session/")}
    assert logged["session/test_R@10_final"] == pytest.approx(latest["test recall_top10_correct_composition"])


def test_custom_layout_of_fashion_iq_charts_the_categories():
    names = [f"{s} recall_top{k}_correct_{c}" for s in ("train", "test") for k in (1, 10, 50)
             for c in ("dress", "shirt")]
    charts = runlog.custom_layout(names)["retrieval"]
    assert charts["R@10"] == ["Multiline", ["train/recall_top10_correct_dress", "train/recall_top10_correct_shirt",
                                            "test/recall_top10_correct_dress", "test/recall_top10_correct_shirt"]]
    assert runlog.headline_recall({"test recall_top10_correct_dress": 0.2, "test recall_top10_correct_shirt": 0.4,
                                   "test recall_top1_correct_dress": 0.9}, "test", 10) == pytest.approx(0.3)


# ------------------------------------------------------------------------------------------------------------------
# A failed start leaves nothing behind
def test_bad_best_metric_is_refused_before_the_first_step(tirg_lstm_run, run_main_cli, tmp_path, monkeypatch):
    import sgd_step

    def no_step(*a, **k):
        raise AssertionError("trained a step")

    monkeypatch.setattr(sgd_step, "train_one_step", no_step)
    rc, out, err = run_main_cli(["--dataset", "mitstates", "--dataset_path", tirg_lstm_run["data"],
                                 *tirg_lstm_run["flags"], "--num_iters", "2", "--best_metric",
                                 "recall_top1_correct_compositon", *execution_flags(tmp_path / "logs")])
    assert rc == 2
    (line,) = [line for line in err.splitlines() if line.startswith("main.py: error: ")]
    assert "--best_metric recall_top1_correct_compositon" in line and "recall_top1_correct_composition" in line
    assert not os.path.exists(tmp_path / "logs") or os.listdir(tmp_path / "logs") == []


def test_a_run_failing_before_its_first_step_leaves_no_folder(tirg_lstm_run, run_main_cli, tmp_path):
    """18 training images cannot fill a batch of 32: refused inside the training loop, after the folder was made."""
    rc, _, err = run_main_cli(["--dataset", "mitstates", "--dataset_path", tirg_lstm_run["data"],
                               *tirg_lstm_run["flags"], "--num_iters", "2", "--batch_size", "32",
                               *execution_flags(tmp_path)])
    assert rc == 2
    assert "fewer than --batch_size 32" in [line for line in err.splitlines() if "error" in line][-1]
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------------------------------
# The command line
def test_help_groups_the_flags_by_purpose():
    parser = config.get_args_parser()
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    for title in ("data", "model", "text", "optimisation", "evaluation", "checkpoints and logging", "speed",
                  "device and distributed"):
        assert groups[title], title
    assert {"dataset", "dataset_path", "category_to_train"} <= set(groups["data"])
    assert {"use_bert", "bert_model", "lstm_dim"} <= set(groups["text"])
    assert {"learning_rate", "learning_rate_decay_frequency", "weight_decay", "batch_size", "loss"} <= set(
        groups["optimisation"])
    assert {"amp", "allow_tf32", "cuda_graph"} <= set(groups["speed"])
    help_text = parser.format_help()
    assert help_text.index("\ndata:") < help_text.index("\nmodel:") < help_text.index("\nspeed:")


@pytest.mark.parametrize("argv, expected", [
    (["--amp"], True), (["--amp", "True"], True), (["--amp", "False"], False), ([], False),
    (["--amp", "--channels_last"], True),
])
def test_boolean_flags_take_the_bare_form(argv, expected):
    args, _ = config.parse_args(argv + ["--use_bert", "True"])
    assert args.amp is expected and args.use_bert is True


def test_allow_tf32_defaults_to_pytorchs_tf32_and_offers_fp32():
    assert config.parse_args([])[0].allow_tf32 is True
    assert config.parse_args(["--allow_tf32", "False"])[0].allow_tf32 is False


@pytest.mark.parametrize("protocol", ["tirg", "tirg_groups", "tirg_ks", "cirr", "fashioniq_standard"])
def test_metric_names_are_known_before_evaluating(protocol):
    """The names that --best_metric is checked against are exactly those the evaluation gives, for every
    protocol."""
    import datasets
    import test_retrieval

    groups = {"dress": [True, False, True], "shirt": [False, True, False]}
    if protocol in ("tirg", "tirg_ks"):
        labels = {"composition": ["a x", "b y", "c z"], "adj": ["a", "b", "c"], "noun": ["x", "y", "z"]}
    else:
        labels = {"image": ["a", "b", "c"]} if protocol != "tirg_groups" else {"composition": ["a", "b", "c"]}
    extra = {"tirg_groups": dict(query_groups=groups), "tirg_ks": dict(ks=(1, 3)),
             "cirr": dict(protocol="cirr", query_exclude=[0, 1, 2], query_subsets=[[1, 2], [0, 2], [0, 1]]),
             "fashioniq_standard": dict(protocol="fashioniq_standard", query_groups=groups,
                                        gallery_groups=groups)}.get(protocol, {})
    targets = {view: [v[2], v[0], v[1]] for view, v in labels.items()}
    task = datasets.RetrievalTask(image_keys=[0, 1, 2], gallery=[0, 1, 2], query_source=[0, 1, 2],
                                  query_text=["t", "u", "v"], gallery_labels=labels, query_targets=targets, **extra)
    g = torch.Generator().manual_seed(0)
    computed = test_retrieval.task_metrics(task, torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g))
    assert test_retrieval.metric_names(task) == list(computed)
