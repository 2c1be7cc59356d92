"""sweep.py: a 2-seed local sweep of a tiny real main.py run (a stopped run resumed, finished runs skipped), the
SLURM path through submitit's in-process debug executor, the sweep's name, and one-line errors."""
from __future__ import annotations

import glob
import json
import os

import pytest

import sweep

# TIRG + LSTM at 32 px on the tiny MIT-States (one epoch = 4-5 steps), evaluated only at the end
TINY = ["--model", "tirg", "--use_bert", "False", "--lstm_dim", "16", "--loss", "soft_triplet", "--image_size", "32",
        "--batch_size", "4", "--train_eval_queries", "8", "--image_weights", "none", "--eval_every", "1000",
        "--log_every", "1", "--device", "cpu", "--loader_num_workers", "0"]


def tiny_flags(data: str, num_iters: int) -> list[str]:
    return ["--dataset", "mitstates", "--dataset_path", data, *TINY, "--num_iters", str(num_iters)]


def metrics_of(seed_dir: str) -> tuple[str, dict]:
    (path,) = glob.glob(os.path.join(seed_dir, "*", "metrics.json"))
    with open(path) as f:
        return os.path.dirname(path), json.load(f)


def test_local_sweep_resumes_a_stopped_run_and_skips_finished_ones(tmp_path, tiny_mitstates, run_main_cli, capsys):
    flags = tiny_flags(tiny_mitstates, 4)
    folder = tmp_path / "logs" / sweep.sweep_name(flags)
    # seed 0 stopped at iteration 2: its run folder holds a latest_checkpoint.pth of iteration 2 and no done marker
    rc, _, err = run_main_cli([*tiny_flags(tiny_mitstates, 2), "--seed", "0", "--log_dir", str(folder / "seed0"),
                               "--comment", "_seed0"])
    assert rc == 0, err
    argv = ["--seeds", "0", "1", "--log_dir", str(tmp_path / "logs"), "--parallel", "2", "--", *flags]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "seed 0: running (resuming" in out and "seed 1: running (new run)" in out
    for seed in (0, 1):
        run, metrics = metrics_of(str(folder / f"seed{seed}"))
        assert metrics["latest"]["it"] == 4 and metrics["history"][-1]["it"] == 4
        assert os.path.isfile(folder / f"seed{seed}" / "done") and run.endswith(f"_seed{seed}")
        assert f"seed {seed}: done, iteration 4, {run}" in out
    run0, _ = metrics_of(str(folder / "seed0"))
    with open(os.path.join(run0, "out.log")) as f:
        assert "resuming from" in f.read()  # continued in the stopped run's folder, from iteration 2

    stamps = {p: os.path.getmtime(p) for p in glob.glob(str(folder / "seed*" / "*" / "*"))}
    console = {s: os.path.getsize(folder / f"seed{s}" / "console.log") for s in (0, 1)}
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (done), iteration 4") == 2 and "running" not in out
    assert stamps == {p: os.path.getmtime(p) for p in glob.glob(str(folder / "seed*" / "*" / "*"))}
    assert console == {s: os.path.getsize(folder / f"seed{s}" / "console.log") for s in (0, 1)}

    with open(folder / "sweep.json") as f:
        assert json.load(f)["flags"] == flags


def test_slurm_path_through_submitit_debug_executor(tmp_path, tiny_mitstates, capsys):
    submitit = pytest.importorskip("submitit")
    flags = tiny_flags(tiny_mitstates, 2)
    argv = ["--seeds", "5", "--log_dir", str(tmp_path), "--name", "array", "--launcher", "slurm", "--cluster",
            "debug", "--gpus_per_node", "0", "--", *flags]
    assert sweep.main(argv) == 0
    out = capsys.readouterr().out
    assert "seed 5: submitted as job" in out and "seed 5: done, iteration 2" in out
    seed_dir = tmp_path / "array" / "seed5"
    run, metrics = metrics_of(str(seed_dir))
    assert metrics["latest"]["it"] == 2 and os.path.isfile(seed_dir / "done")
    with open(seed_dir / "console.log") as f:
        assert "--seed 5" in f.read()
    # pre-emption: the requeued call resumes from the run's latest checkpoint
    spec = sweep.Sweep(folder=str(tmp_path / "array"), flags=tuple(flags))
    job = sweep.SeedJob(spec, gpus_per_node=0)
    assert isinstance(job, submitit.helpers.Checkpointable)
    os.remove(seed_dir / "done")
    again = job.checkpoint(5)
    assert isinstance(again, submitit.helpers.DelayedSubmission) and again.function is job
    assert again.args == (5,) and again.kwargs["resume"] == os.path.join(run, "latest_checkpoint.pth")


def test_name_is_stable_under_flag_order_and_changes_with_a_value():
    a = ["--dataset", "mitstates", "--model", "tirg", "--learning_rate", "0.01", "--loss_weights", "1", "2"]
    b = ["--loss_weights", "1", "2", "--learning_rate=0.01", "--model", "tirg", "--dataset", "mitstates"]
    assert sweep.sweep_name(a) == sweep.sweep_name(b)
    assert sweep.sweep_name(a).startswith("mitstates-tirg-")
    assert sweep.sweep_name(a) != sweep.sweep_name([*a[:-1], "3"])
    assert sweep.sweep_name([]).startswith("synthetic-composeAE-")


def test_last_iteration_reads_the_training_bar_and_summary_table():
    text = ("train:  50%|#####     | 3/8 [00:01<00:00, loss=2.0]\reval test images: 100%|###| 9/9 [00:00<00:00]\n"
            "iteration 3          R@1\n")
    assert sweep.last_iteration(text) == 3
    assert sweep.last_iteration("train: 100%|##########| 8/8 [00:03<00:00]\n") == 8
    assert sweep.last_iteration("no progress yet\n") is None


@pytest.mark.parametrize("ours, main_flags, words", [
    (["--seeds"], ["--model", "tirg"], "--seeds"),
    ([], ["--model", "tirg"], "--seeds"),
    (["--seeds", "0"], ["--seed", "3"], "--seed"),
    (["--seeds", "0"], ["--log_dir=x"], "--log_dir"),
    (["--seeds", "0"], ["--see", "3"], "--see"),
    (["--seeds", "0", "0"], [], "twice"),
    (["--seeds", "0", "--parallel", "0"], [], "--parallel"),
    (["--seeds", "0", "--name", "a/b"], [], "--name"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, ours, main_flags, words):
    assert sweep.main([*ours, "--log_dir", str(tmp_path), "--", *main_flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sweep.py: error: ") and words in err[0]
    assert not os.listdir(tmp_path)  # nothing started


def test_slurm_without_submitit_or_sbatch_and_a_name_of_other_flags(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "submitit", None)
    assert sweep.main(["--seeds", "0", "--log_dir", str(tmp_path), "--launcher", "slurm"]) == 2
    assert "needs submitit" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(sweep.shutil, "which", lambda name: None)
    assert sweep.main(["--seeds", "0", "--log_dir", str(tmp_path), "--launcher", "slurm"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err
    os.makedirs(tmp_path / "mine")
    with open(tmp_path / "mine" / "sweep.json", "w") as f:
        json.dump({"flags": ["--model", "tirg"], "seeds": [0]}, f)
    assert sweep.main(["--seeds", "0", "--log_dir", str(tmp_path), "--name", "mine", "--", "--model", "composeAE"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other main.py flags" in err[0]


def test_a_three_seed_sweep_reports_the_mean_and_sd_of_its_runs(tmp_path, tiny_mitstates, capsys):
    import statistics

    import report

    flags = tiny_flags(tiny_mitstates, 2)
    assert sweep.main(["--seeds", "0", "1", "2", "--log_dir", str(tmp_path), "--name", "three", "--parallel", "3",
                       "--", *flags]) == 0
    finals = {}
    for seed in (0, 1, 2):
        _, metrics = metrics_of(str(tmp_path / "three" / f"seed{seed}"))
        finals[seed] = metrics["latest"]
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "three"), "--out", str(out)]) == 0
    capsys.readouterr()
    (group,) = json.loads((out / "report.json").read_text())["groups"]
    assert sorted(group["seeds"]) == [0, 1, 2]
    for name in ("test recall_top1_correct_composition", "test recall_top10_correct_composition"):
        values = [finals[s][name] for s in group["seeds"]]
        assert group["final"][name]["values"] == values
        assert group["final"][name]["mean"] == pytest.approx(statistics.mean(values))
        assert group["final"][name]["sd"] == pytest.approx(statistics.stdev(values))
    tirg = [p for p in group["published"] if p["model"] == "tirg" and p["dataset"] == "mitstates"]
    assert tirg and all(p["arxiv"] == "1812.07119" for p in tirg)
    assert group["comparable"] is False
    assert any("2 iterations" in r for r in group["why_not"]) and any("image weights" in r for r in group["why_not"])
    assert any("synthetic generator" in r and tiny_mitstates in r for r in group["why_not"])
    assert len(group["provenance"]["runs_without_run_json"]) == 0  # every run recorded its provenance
