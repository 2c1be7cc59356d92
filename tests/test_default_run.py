"""benchmark.py --mode default (``benchmarks.default_run``): `python main.py` timed as a first run, and the synthetic
default's recorded R@1 range."""
from __future__ import annotations

import json
import os

import pytest

import benchmark
from benchmarks import default_run
from errors import UserInputError
from retrieval_datasets import registry

# A short default run: every flag but these is the embedded default's
SHORT = "--num_iters 4 --eval_every 4 --train_eval_queries 20 --save_every 4"


def test_a_default_run_prints_one_json_line_with_its_times_recall_and_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "default.jsonl"
    assert benchmark.main(["--mode", "default", "--threads", "1", "--seeds", "3", "--main_flags", SHORT,
                           "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and out.read_text() == lines[0] + "\n"
    result = json.loads(lines[0])
    assert {"wall_s", "cpu_s", "threads", "test_recall_at_1", "iterations", "machine", "seed"} <= set(result)
    assert result["wall_s"] > 0 and result["cpu_s"] > 0
    assert 0.0 <= result["test_recall_at_1"] <= 1.0
    assert (result["seed"], result["iterations"], result["threads"]) == (3, 4, 1)
    assert result["main_flags"] == SHORT.split()
    assert result["machine"]["cpu_count"] == os.cpu_count() and result["machine"]["load_avg_1m"] >= 0
    assert result["command"].startswith("python main.py --seed 3")
    assert sorted(os.listdir(tmp_path)) == ["default.jsonl"]  # data and run folder: in a temporary folder


def test_a_failed_run_is_one_error_line_with_the_end_of_its_output(capsys):
    assert benchmark.main(["--mode", "default", "--seeds", "0", "--main_flags", "--num_iters -1"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("benchmark.py: error: ") and "--num_iters" in captured.err


@pytest.mark.parametrize("seeds", ["", "a,b", "1,-2"])
def test_bad_seeds_are_refused_before_any_run(seeds, capsys):
    assert benchmark.main(["--mode", "default", "--seeds", seeds]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("benchmark.py: error: --seeds")


def test_seeds_run_in_order_one_result_each(monkeypatch):
    calls = []
    monkeypatch.setattr(default_run, "run_seed", lambda seed, threads, extra: calls.append((seed, threads, extra))
                        or {"seed": seed})
    args = benchmark.get_args_parser().parse_args(["--mode", "default", "--seeds", "2,0,1", "--threads", "2",
                                                   "--main_flags", "--num_iters 3"])
    assert [r["seed"] for r in default_run.default_main(args)] == [2, 0, 1]
    assert calls == [(s, 2, ["--num_iters", "3"]) for s in (2, 0, 1)]


def test_the_command_passes_threads_only_where_main_py_has_the_flag():
    cmd = default_run.main_command(5, 1, ["--num_iters", "2"])
    assert cmd[1] == default_run.MAIN and os.path.isabs(cmd[1]) and cmd[2:4] == ["--seed", "5"]
    assert cmd[-2:] == ["--num_iters", "2"]
    has_threads = any("--threads" in a.option_strings for a in benchmark.config.get_args_parser()._actions)
    assert ("--threads" in cmd) == has_threads
    assert "--threads" not in default_run.main_command(5, 0, [])


def test_the_final_metrics_are_the_latest_evaluation_of_the_run_folder(tmp_path):
    with pytest.raises(RuntimeError, match="no metrics.json"):
        default_run.final_metrics(str(tmp_path))
    run = tmp_path / "logs" / "Dec07_run"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"latest": {"it": 7, default_run.R1: 0.5}, "history": []}))
    (run / "args.json").write_text(json.dumps({"args": {"threads": 1, "seed": 3}}))
    assert default_run.final_metrics(str(tmp_path)) == ({"it": 7, default_run.R1: 0.5}, {"threads": 1, "seed": 3})


def test_parse_seeds():
    assert default_run.parse_seeds("0, 1,2") == [0, 1, 2]
    with pytest.raises(UserInputError, match="--seeds"):
        default_run.parse_seeds("0.5")


def test_the_synthetic_default_records_its_measured_recall_range():
    low, high = registry.dataset_spec("synthetic").reference_recall_at_1
    assert 0.45 <= low <= high <= 1.0
    assert all(spec.reference_recall_at_1 is None for name, spec in registry.DATASETS.items() if name != "synthetic")


def test_benchmark_retrieve_backends_print_one_json_line_each(tmp_path, capsys):
    """--mode retrieve --backend: the index measured on synthetic vectors, one JSON line per backend with the
    issue's keys; exact search on float32 storage finds the float32 ground truth exactly."""
    rc = benchmark.main(["--mode", "retrieve", "--backend", "exact", "--gallery_size", "3000", "--dim", "16",
                         "--index_workdir", str(tmp_path), "--threads", "1"])
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert rc == 0 and len(lines) == 1
    (line,) = lines
    assert {"backend", "gallery_size", "build_s", "index_bytes", "peak_rss_bytes", "query_ms_p50", "query_ms_p95",
            "batch64_ms_p50", "recall_at_10"} <= set(line)
    assert line["backend"] == "exact" and line["gallery_size"] == 3000 and line["recall_at_10"] == 1.0
    assert line["index_bytes"] == 3000 * 16 * 4 and line["query_ms_p50"] > 0
