"""run.json: what produced a run (command, git state, versions, device, processes, times), one session per process
start; a resumed run adds its own; a stopped or failed run records how it ended."""
from __future__ import annotations

import glob
import json
import os
import subprocess
from datetime import datetime

import numpy
import pytest
import torch

import provenance


def read_run_file(folder: str) -> dict:
    with open(os.path.join(folder, "run.json")) as f:
        return json.load(f)


def test_a_finished_run_records_its_provenance(tirg_lstm_run):
    data = read_run_file(tirg_lstm_run["folder"])
    assert data["format"] == provenance.FORMAT
    (session,) = data["sessions"]
    assert session["status"] == "finished" and session["processes"] == 1
    assert session["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert session["versions"]["numpy"] == numpy.__version__
    assert set(session["versions"]) == set(provenance.LIBRARIES)
    assert session["device"] == "cpu" and session["cuda"] == torch.version.cuda
    start, end = (datetime.fromisoformat(session[k]) for k in ("start", "end"))
    assert 0 <= (end - start).total_seconds() <= session["wall_s"] + 1 and session["wall_s"] > 0
    assert session["argv"][0] == "main.py" and session["argv"][-2:] == ["--log_dir", tirg_lstm_run["log_dir"]]
    assert session["command"].startswith("python") and "--num_iters 4" in session["command"]
    assert "_t0" not in session  # the private monotonic start stays out of the file
    git = session["git"]
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    with open(os.path.join(tirg_lstm_run["folder"], "args.json")) as f:
        assert json.load(f)["git_commit"] == provenance.commit_label(git)


def test_git_state_reads_the_checkout_and_its_changes(tmp_path):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("git is not installed")
    repo = str(tmp_path)
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    with open(os.path.join(repo, "f.txt"), "w") as f:
        f.write("a\n")
    run("add", "f.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert provenance.git_state(repo) == {"commit": head, "dirty": False}
    with open(os.path.join(repo, "f.txt"), "a") as f:
        f.write("b\n")
    assert provenance.git_state(repo) == {"commit": head, "dirty": True}
    assert provenance.commit_label(provenance.git_state(repo)) == head + "+changes"


def test_outside_git_the_state_is_none(tmp_path):
    assert provenance.git_state(str(tmp_path / "missing")) is None  # no such folder: git cannot run there


def execution_flags(log_dir) -> list[str]:
    return ["--device", "cpu", "--loader_num_workers", "0", "--log_dir", str(log_dir)]


def test_a_resumed_run_adds_a_session(tmp_path, tirg_lstm_run, run_main_cli):
    log_dir = tmp_path / "logs"
    flags = ["--dataset", "mitstates", "--dataset_path", tirg_lstm_run["data"], *tirg_lstm_run["flags"]]
    rc, _, err = run_main_cli([*flags, "--num_iters", "2", *execution_flags(log_dir)])
    assert rc == 0, err
    (folder,) = glob.glob(str(log_dir / "*"))
    rc, _, err = run_main_cli(["--resume", os.path.join(folder, "latest_checkpoint.pth"), "--num_iters", "4",
                               *execution_flags(log_dir)])
    assert rc == 0, err
    first, second = read_run_file(folder)["sessions"]
    assert first["status"] == second["status"] == "finished"
    assert "--resume" in second["argv"] and "--resume" not in first["argv"]
    assert second["start"] >= first["end"]


def test_an_aborted_session_records_how_it_ended():
    record = provenance.session_record(None, 2, ["main.py", "--seed", "1"])
    assert record["status"] == "running" and record["end"] is None and record["processes"] == 2
    assert record["command"].endswith("main.py --seed 1")
    provenance.finish(record, "interrupted")
    public = provenance.public(record)
    assert public["status"] == "interrupted" and public["end"] and public["wall_s"] >= 0
    assert "_t0" not in public and json.loads(json.dumps(public)) == public


def test_run_json_holds_the_datasets_fingerprint_as_metrics_json(tirg_lstm_run):
    (session,) = read_run_file(tirg_lstm_run["folder"])["sessions"]
    with open(os.path.join(tirg_lstm_run["folder"], "metrics.json")) as f:
        metrics = json.load(f)
    assert session["data_fingerprint"] == metrics["data_fingerprint"]
    assert len(session["data_fingerprint"]["sha256"]) == 64


def _run_args(log_dir, **changes):
    import config

    args = config.get_args_parser().parse_args([])
    vars(args).update(dataset="mitstates", log_dir=str(log_dir), test_only=True, **changes)
    return args


def test_a_failed_write_of_args_json_removes_the_new_folder(tmp_path, monkeypatch):
    import runlog
    from checkpoint import WriteFailed

    folder = tmp_path / "run"
    folder.mkdir()
    real = runlog.write_json

    def full_disk(path, data, advice=""):
        if path.endswith("args.json"):
            raise WriteFailed(f"cannot write {path}: no space left on device; {advice}")
        return real(path, data, advice)

    monkeypatch.setattr(runlog, "write_json", full_disk)
    with pytest.raises(WriteFailed, match="args.json"):
        runlog.Run(_run_args(tmp_path), str(folder), created=True)
    assert not folder.exists()  # the new folder is removed, lock included


def test_a_failure_while_closing_records_the_session_as_failed(tmp_path, monkeypatch):
    import runlog
    from checkpoint import WriteFailed

    folder = str(tmp_path / "run")
    run = runlog.Run(_run_args(tmp_path), folder, created=True)
    run.started = True
    run.metrics({"test recall_top1_correct_composition": 0.5}, 3)

    def full_disk():
        raise WriteFailed("cannot write metrics.json: no space left on device")

    run.live_info = lambda: full_disk()
    with pytest.raises(WriteFailed):
        run.close({}, 3)
    (session,) = read_run_file(folder)["sessions"]
    assert session["status"] == "failed" and session["end"] is not None
    assert not os.path.exists(os.path.join(folder, "run.lock"))


def test_resuming_a_folder_without_run_json_says_earlier_sessions_are_unknown(tmp_path):
    import runlog

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"latest": {"it": 2}, "history": [{"it": 2}]}))
    run = runlog.Run(_run_args(tmp_path), str(folder))
    run.release()
    data = read_run_file(str(folder))
    assert data["earlier_sessions_unknown"] is True and len(data["sessions"]) == 1
