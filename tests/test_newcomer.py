"""What a newcomer sees: a captured log without progress bars (plain progress lines, metric lines grep finds), out.log
for ``tail -f`` (progress, interruption line), an out.log on a full disk, --threads, the yardstick line, the summary
table without recall@k >= the gallery size, the evaluation schedules, train queries capped at those available, the
default --log_dir, the resume warning as the last line, and TensorBoard's HParams trial."""
from __future__ import annotations

import argparse
import dataclasses
import errno
import glob
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import config
import console
import progress
import runlog
import training
from retrieval_datasets import registry
from retrieval_datasets.base import _RetrievalDataset
from retrieval_datasets.mitstates import MITStates
from seeding import Stream, seeded_rng

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRESS_LINE = re.compile(r"^iteration (\d+)/(\d+)  loss \d+\.\d{4} \((\w[\w ]* \d+\.\d{4}(, )?)+\)  "
                           r"\d+\.\d samples/s  ETA (\d+:\d\d:\d\d|\?)$")
METRIC_LINE = re.compile(r"^\s*test recall_")  # grep '^\s*test recall_'


def tiny_flags(data: str, *extra: str) -> list[str]:
    """A tiny TIRG + LSTM run on the MIT-States layout, on the CPU (no --log_dir: callers add it or not)."""
    return ["--dataset", "mitstates", "--dataset_path", data, "--model", "tirg", "--use_bert", "False",
            "--lstm_dim", "16", "--loss", "soft_triplet", "--image_size", "32", "--batch_size", "4",
            "--train_eval_queries", "8", "--image_weights", "none", "--loader_num_workers", "0", "--device", "cpu",
            "--seed", "3", *extra]


@pytest.fixture(scope="module")
def default_log_dir_run(tmp_path_factory, tiny_mitstates, run_main_cli) -> dict:
    """17 iterations (epochs of 4 steps) with --eval_every 0 and --threads 1, no --log_dir, run in an empty
    folder; torch starts with 2 threads."""
    cwd, before = os.getcwd(), torch.get_num_threads()
    where = tmp_path_factory.mktemp("default_log_dir")
    torch.set_num_threads(2)
    try:
        os.chdir(where)
        rc, out, err = run_main_cli(tiny_flags(tiny_mitstates, "--num_iters", "17", "--eval_every", "0",
                                               "--log_every", "4", "--threads", "1"), threads=None)
        threads = torch.get_num_threads()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(before)
    assert rc == 0, err
    return {"where": where, "out": out, "err": err, "threads": threads,
            "folders": glob.glob(os.path.join(str(where), "logs", "*"))}


# ------------------------------------------------------------------------------------------------------------------
# A captured log, and out.log for tail -f
def test_a_captured_log_is_clean_and_out_log_ends_with_the_interruption(tiny_mitstates, tmp_path):
    log_dir = tmp_path / "logs"
    argv = tiny_flags(tiny_mitstates, "--num_iters", "100000", "--eval_every", "2", "--log_every", "1",
                      "--save_every", "100000", "--threads", "1", "--log_dir", str(log_dir))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "run.log", "w") as log:  # python main.py ... > run.log 2>&1
        proc = subprocess.Popen([sys.executable, "main.py", *argv], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not re.search(r"^iteration [4-9]/100000 ", (tmp_path / "run.log").read_text(), re.M):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 128 + signal.SIGINT
    text = (tmp_path / "run.log").read_text()
    assert "\r" not in text and "Traceback" not in text
    lines = text.splitlines()
    assert not [line for line in lines if re.match(r"^\s*(train|eval \w+)[^:]*: *\d+%\|", line) or "it/s]" in line]
    metric = [line for line in lines if METRIC_LINE.match(line)]
    assert len(metric) >= 15 and all(line.startswith("     test recall_top") for line in metric)
    progress_lines = [line for line in lines if line.startswith("iteration ") and "/100000" in line]
    assert len(progress_lines) >= 4 and all(PROGRESS_LINE.match(line) for line in progress_lines), progress_lines
    assert [int(PROGRESS_LINE.match(line).group(1)) for line in progress_lines[:4]] == [1, 2, 3, 4]
    last = lines[-1]
    assert re.fullmatch(r"main\.py: SIGINT: interrupted at iteration \d+; resume with: main\.py --resume .*", last)
    (folder,) = glob.glob(os.path.join(str(log_dir), "*"))
    out_log = open(os.path.join(folder, "out.log")).read()
    assert "\r" not in out_log
    assert [line for line in out_log.splitlines() if PROGRESS_LINE.match(line)][:4] == progress_lines[:4]
    assert [line for line in out_log.splitlines() if METRIC_LINE.match(line)][:15] == metric[:15]
    assert out_log.splitlines()[-1] == last  # tail -f out.log ends with it too


def test_progress_follows_the_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress.progress(range(3)), progress.QuietProgress)
    assert list(progress.progress(range(3))) == [0, 1, 2]
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.progress(range(3), desc="eval")
    assert not isinstance(bar, progress.QuietProgress) and list(bar) == [0, 1, 2]
    assert isinstance(progress.progress(range(3), disable=True), progress.QuietProgress)


def test_progress_line_format():
    line = progress.progress_line(40, 300, {"soft_triplet": 1.1, "L2_loss": 0.01, "total training loss": 1.2345},
                                  52.1, 4)
    assert line == ("iteration 40/300  loss 1.2345 (soft_triplet 1.1000, L2_loss 0.0100)  52.1 samples/s  "
                    "ETA 0:00:20")  # 260 iterations at 52.1 / 4 = 13.0 iterations a second
    assert PROGRESS_LINE.match(line)
    assert progress.eta(10, 0.0) == "?"


def test_a_full_disk_stops_out_log_with_one_warning_and_no_traceback(tmp_path, caplog, capsys):
    handler = console.OutLog(str(tmp_path / "out.log"))
    log = logging.getLogger("test_newcomer.out_log")
    log.propagate, log.level = False, logging.INFO
    log.addHandler(handler)
    console.open_out_logs.append(handler)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        log.info("written")
        handler.stream.write = full
        with caplog.at_level(logging.WARNING, logger="main"):
            for n in range(3):
                log.info("line %d", n)
                console.echo(f"     test recall_top1_correct_composition 0.{n}")
    finally:
        log.removeHandler(handler)
        console.out_log_ended(handler)
        handler.stream.write = io.StringIO().write
        handler.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "out.log can no longer be written" in warnings[0], warnings
    assert "No space left on device" in warnings[0]
    err = capsys.readouterr().err
    assert "Logging error" not in err and "Traceback" not in err
    assert open(tmp_path / "out.log").read().strip().endswith("written")


# ------------------------------------------------------------------------------------------------------------------
# --threads, the default --log_dir, the original's evaluation schedule
def test_threads_takes_effect(default_log_dir_run):
    assert default_log_dir_run["threads"] == 1


def test_a_real_dataset_without_log_dir_lands_under_logs(default_log_dir_run):
    (folder,) = default_log_dir_run["folders"]
    assert os.path.isfile(os.path.join(folder, "latest_checkpoint.pth"))
    assert os.listdir(default_log_dir_run["where"]) == ["logs"]


def test_the_original_datasets_keep_the_original_schedule(default_log_dir_run):
    (folder,) = default_log_dir_run["folders"]
    with open(os.path.join(folder, "metrics.json")) as f:
        history = json.load(f)["history"]
    assert [h["it"] for h in history] == [4, 16, 17]  # after epochs 1 and 4 (4 steps each), and at the end


@pytest.mark.parametrize("dataset, num_iters, expected", [
    ("synthetic", 300, [38, 75, 113, 150, 188, 225, 263, 300]),
    ("triplets", 16, [2, 4, 6, 8, 10, 12, 14, 16]),
    ("cirr", 20, [3, 5, 8, 10, 13, 15, 18, 20]),
    ("triplets", 5, [1, 2, 3, 4, 5]),
    ("mitstates", 40, [4, 16, 28, 40]),
    ("fashion200k", 40, [4, 16, 28, 40]),
    ("css3d", 40, [4, 16, 28, 40]),
    ("fashionIQ", 40, [4, 16, 28, 40]),
])
def test_eval_every_0_follows_the_registry_schedule(dataset, num_iters, expected):
    args = argparse.Namespace(dataset=dataset, num_iters=num_iters, eval_every=0, log_every=1000, save_every=1000)
    evaluated = [it for it in range(1, num_iters + 1) if training.stages_due(args, it, 4)[1]]
    assert evaluated == expected
    args.eval_every = 3  # a given --eval_every is kept
    given = [it for it in range(1, num_iters + 1) if training.stages_due(args, it, 4)[1]]
    assert given == sorted({*range(3, num_iters + 1, 3), num_iters})


def test_triplets_evaluate_eight_times_at_the_default(triplets_data, tmp_path, triplets_tools):
    argv = triplets_tools.cli(triplets_data, tmp_path, "--num_iters", "16")
    argv[argv.index("--eval_every") + 1] = "0"
    rc, _ = triplets_tools.run(argv)
    assert rc == 0
    (folder,) = glob.glob(os.path.join(str(tmp_path), "*"))
    with open(os.path.join(folder, "metrics.json")) as f:
        assert [h["it"] for h in json.load(f)["history"]] == [2, 4, 6, 8, 10, 12, 14, 16]


def test_eval_every_help_names_both_schedules():
    (action,) = [a for a in config.get_args_parser()._actions if a.dest == "eval_every"]
    assert "after epochs 1, 4, 7" in action.help and "8 times per run" in action.help
    assert "mitstates" in action.help and "triplets" in action.help
    (action,) = [a for a in config.get_args_parser()._actions if a.dest == "num_iters"]
    assert "total number of training iterations" in action.help and "resumed run continues" in action.help


# ------------------------------------------------------------------------------------------------------------------
# Train queries: never more than there are
def test_train_queries_are_capped_at_those_available(tiny_mitstates):
    train = MITStates(tiny_mitstates, "train", image_size=32, use_complete_text_query=False, seed=0, image_cache=None)
    task = train.train_task(500, seed=0)
    assert len(task.query_source) == len(train._sources) == 18
    assert len({task.image_keys[q] for q in task.query_source}) == 18  # each source once
    assert len(train.train_task(5, seed=0).query_source) == 5


def test_fewer_train_queries_than_available_are_sampled_as_before():
    pool = list(range(100, 140))
    expected = seeded_rng(7, Stream.TRAIN_TASK).choice(pool, size=12, replace=False).tolist()
    assert _RetrievalDataset._sample_sources(pool, 12, 7) == expected
    assert sorted(_RetrievalDataset._sample_sources(pool, 99, 7)) == pool


# ------------------------------------------------------------------------------------------------------------------
# The yardstick and the summary table
def test_summary_table_drops_recall_at_or_above_the_gallery_size():
    metrics = {f"{s} recall_top{k}_correct_composition": k / 100 for s in ("train", "test") for k in (1, 5, 10, 50)}
    lines = runlog.summary_table(metrics, 7, None, {"train": 10, "test": 40})
    assert lines[0].split() == ["iteration", "7", "R@1", "R@5", "R@10", "(%)"]
    assert lines[1].split() == ["train", "composition", "1.00", "5.00"]  # R@10 of a 10-image gallery: left out
    assert lines[2].split() == ["test", "composition", "1.00", "5.00", "10.00"]
    assert runlog.summary_table(metrics, 7, None)[0].split()[2:6] == ["R@1", "R@5", "R@10", "R@50"]


def test_yardstick_line_and_the_reference_range(monkeypatch):
    args = argparse.Namespace(dataset="synthetic", test_only=False, select_on="test", resume="")
    run = runlog.Run(args, "unused", enabled=False)
    assert run.yardstick() == ""
    run.galleries = {"train": (500, 100), "test": (240, 40)}
    measured = registry.DATASETS["synthetic"].reference_recall_at_1
    assert run.yardstick() == ("yardstick: test gallery 240 images, 40 target classes; chance recall@1 2.50%; the "
                               f"default run reaches recall@1 {100 * measured[0]:.1f}-{100 * measured[1]:.1f}%")
    monkeypatch.setitem(registry.DATASETS, "synthetic",
                        dataclasses.replace(registry.DATASETS["synthetic"], reference_recall_at_1=None))
    assert run.yardstick() == "yardstick: test gallery 240 images, 40 target classes; chance recall@1 2.50%"
    spec = dataclasses.replace(registry.DATASETS["synthetic"], reference_recall_at_1=(0.25, 0.31))
    monkeypatch.setitem(registry.DATASETS, "synthetic", spec)
    assert run.yardstick().endswith("; the default run reaches recall@1 25.0-31.0%")
    args.select_on = "val"
    run.galleries["val"] = (60, 12)
    assert run.yardstick().startswith("yardstick: val gallery 60 images, 12 target classes; chance recall@1 8.33%")


def test_a_run_ends_with_the_yardstick(default_log_dir_run):
    lines = default_log_dir_run["out"].strip().splitlines()
    # 1 test noun x 3 adjectives x 3 images: 3 compositions
    assert lines[-1] == "yardstick: test gallery 9 images, 3 target classes; chance recall@1 33.33%"


# ------------------------------------------------------------------------------------------------------------------
# Resuming to a --num_iters already reached: the warning is the last line
def test_resume_at_num_iters_warns_last(default_log_dir_run, run_main_cli):
    (folder,) = default_log_dir_run["folders"]
    rc, out, err = run_main_cli(["--resume", os.path.join(folder, "latest_checkpoint.pth"), "--num_iters", "17",
                                 "--loader_num_workers", "0"])
    assert rc == 0, err
    last = err.strip().splitlines()[-1]
    assert "is at iteration 17 already: --num_iters 17 trains nothing more" in last
    assert "total number of iterations" in last
    with open(os.path.join(folder, "out.log")) as f:
        assert "trains nothing more" in f.read().strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------------------------
# TensorBoard: one HParams trial per training run, none for --test_only
def hparams_plugin_tags(folder: str) -> tuple[set[str], object]:
    """The HParams plugin's tags in ``folder``'s events, and its EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(folder, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return {tag for tag in acc.Tags()["tensors"] if tag.startswith("_hparams_/")}, acc


def test_training_run_is_one_hparams_trial_without_hparam_scalars(default_log_dir_run):
    (folder,) = default_log_dir_run["folders"]
    tags, acc = hparams_plugin_tags(folder)
    assert tags == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}
    scalars = acc.Tags()["scalars"]
    assert not [t for t in scalars if t.startswith("hparam/")]
    assert {"session/test_R@1_final", "session/test_R@1_best"} <= set(scalars)
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert "f" not in start.hparams and start.hparams["model"].string_value == "tirg"
    assert start.hparams["amp"].bool_value is False
    card = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| --f |" not in card and "| -f |" not in card and "| --model | `tirg` |" in card


def test_test_only_is_no_trial_and_writes_eval_scalars(default_log_dir_run, run_main_cli, tmp_path):
    (folder,) = default_log_dir_run["folders"]
    rc, out, err = run_main_cli(["--test_only", "--model_checkpoint", os.path.join(folder, "best_checkpoint.pth"),
                                 "--log_dir", str(tmp_path), "--device", "cpu", "--loader_num_workers", "0"])
    assert rc == 0, err
    (evaluation,) = glob.glob(os.path.join(str(tmp_path), "eval_*"))
    tags, acc = hparams_plugin_tags(evaluation)
    assert tags == set()
    scalars = acc.Tags()["scalars"]
    assert "eval/test/recall_top1_correct_composition" in scalars
    assert not [t for t in scalars if not t.startswith("eval/")]
    assert out.strip().splitlines()[-1].startswith("yardstick: test gallery 9 images")
