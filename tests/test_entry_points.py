"""Every entry point ends in one line: a signal during --test_only, a checkpoint whose settings would size a huge
model, and the last resort for an unexpected exception (``errors.report_internal_error``)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import benchmark
import factory
import main
import report
import retrieve
import sweep
from checkpoint import read_checkpoint, save_checkpoint
from errors import UserInputError
from interrupts import EvaluationInterrupted, stop_evaluation_on_interrupt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACEBACK = "Traceback (most recent call last)"


def execution_flags(log_dir) -> list[str]:
    return ["--device", "cpu", "--loader_num_workers", "0", "--log_dir", str(log_dir)]


def latest(run: dict) -> str:
    return os.path.join(run["folder"], "latest_checkpoint.pth")


def stderr_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def internal_error_file(program: str, err: str) -> str:
    """The file named by the one ``<program>: internal error: RuntimeError: boom`` line of ``err``."""
    lines = stderr_lines(err)
    assert len(lines) == 1, lines
    head = f"{program}: internal error: RuntimeError: boom; the traceback is in "
    assert lines[0].startswith(head), lines[0]
    return lines[0][len(head):]


def assert_traceback_in(path: str) -> str:
    text = open(path, encoding="utf-8").read()
    assert TRACEBACK in text and ", in boom\n" in text and text.rstrip().endswith("RuntimeError: boom"), text[-500:]
    return text


def boom(*args, **kwargs):
    raise RuntimeError("boom")


# ----------------------------------------------------------------------------------------------------------------
# A signal during --test_only
# ----------------------------------------------------------------------------------------------------------------

def test_the_evaluation_handlers_raise_at_once_and_come_back(monkeypatch):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        with pytest.raises(EvaluationInterrupted) as info:
            with stop_evaluation_on_interrupt("runs/x.pth"):
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler interrupts this
        assert (info.value.signum, info.value.checkpoint, info.value.exit_code) == (sig, "runs/x.pth", 128 + sig)
    assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_during_test_only_is_one_line_exit_143_and_no_metrics(tirg_lstm_run, tmp_path):
    """A 384-px evaluation on one thread takes far longer than the wait before the signal."""
    logs, err_path = tmp_path / "logs", tmp_path / "stderr.txt"
    argv = [sys.executable, os.path.join(ROOT, "main.py"), "--dataset", "mitstates", "--dataset_path",
            tirg_lstm_run["data"], "--test_only", "True", "--model_checkpoint", latest(tirg_lstm_run),
            "--image_size", "384", "--eval_batch_size", "2", *execution_flags(logs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(err_path, "w") as err:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, cwd=str(tmp_path), env=env)
    try:
        deadline, folder = time.monotonic() + 120, None
        while folder is None and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            for line in err_path.read_text().splitlines():
                if "log files saved to " in line:
                    folder = line.split("log files saved to ", 1)[1].strip()
        assert folder is not None and child.poll() is None, err_path.read_text()[-2000:]
        time.sleep(1.0)  # inside the evaluation
        child.send_signal(signal.SIGTERM)
        rc = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    lines = stderr_lines(err_path.read_text())
    assert rc == 143, lines[-5:]
    assert lines[-1] == (f"main.py: SIGTERM: interrupted during the evaluation of {latest(tirg_lstm_run)}; "
                         f"nothing written")
    assert not os.path.exists(os.path.join(folder, "metrics.json"))
    assert not glob.glob(os.path.join(str(logs), "**", "metrics.json"), recursive=True)


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint whose settings would size a huge model
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture
def huge_image_checkpoint(tirg_lstm_run, tmp_path) -> str:
    state = read_checkpoint(latest(tirg_lstm_run))
    state["args"]["image_size"] = 200000
    path = str(tmp_path / "run" / "latest_checkpoint.pth")
    os.makedirs(os.path.dirname(path))
    save_checkpoint(path, state)
    return path


HUGE = "'image_size' is 200000, outside 1..4096; pass a checkpoint written by main.py"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_before_training_is_one_line_and_leaves_no_run_folder(tiny_mitstates, tmp_path, capsys,
                                                                       monkeypatch, signum):
    """SIGTERM / SIGUSR1 while the model is being built: one line, 128 + the signal, no run folder or lock left,
    and the process's handlers as they were."""
    before = signal.getsignal(signum)

    def signal_while_building(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(main, "build_experiment", signal_while_building)
    rc = main.main(["--dataset", "mitstates", "--dataset_path", tiny_mitstates, "--model", "tirg", "--use_bert",
                    "False", "--image_weights", "none", *execution_flags(tmp_path / "logs")])
    lines = stderr_lines(capsys.readouterr().err)
    name = signal.Signals(signum).name
    assert rc == 128 + signum and lines[-1] == (f"main.py: {name}: interrupted; stopped without writing a checkpoint "
                                                f"(any written before is intact)"), lines
    assert not os.path.exists(tmp_path / "logs") or os.listdir(tmp_path / "logs") == []
    assert signal.getsignal(signum) is before


@pytest.mark.parametrize("how", ["--test_only", "--resume"])
def test_main_refuses_a_checkpoint_with_a_huge_image_size_in_one_line(huge_image_checkpoint, tirg_lstm_run, tmp_path,
                                                                      capsys, how):
    flags = ["--test_only", "True", "--model_checkpoint"] if how == "--test_only" else ["--resume"]
    rc = main.main(["--dataset", "mitstates", "--dataset_path", tirg_lstm_run["data"], *flags, huge_image_checkpoint,
                    *execution_flags(tmp_path / "logs")])
    lines = stderr_lines(capsys.readouterr().err)
    assert rc == 2 and lines == [f"main.py: error: checkpoint {huge_image_checkpoint}: {HUGE}"], lines
    assert not os.path.exists(tmp_path / "logs")
    assert os.listdir(os.path.dirname(huge_image_checkpoint)) == ["latest_checkpoint.pth"]


def test_retrieve_and_factory_refuse_a_checkpoint_with_a_huge_image_size(huge_image_checkpoint, tirg_lstm_run,
                                                                         capsys):
    gallery = os.path.join(tirg_lstm_run["data"], "images")
    image = sorted(glob.glob(os.path.join(gallery, "*", "*.jpg")))[0]
    rc = retrieve.main(["--model_checkpoint", huge_image_checkpoint, "--gallery", gallery, "--image", image,
                        "--text", "red", "--device", "cpu"])
    lines = stderr_lines(capsys.readouterr().err)
    assert rc == 2 and lines == [f"retrieve.py: error: checkpoint {huge_image_checkpoint}: {HUGE}"], lines
    with pytest.raises(UserInputError, match="'image_size' is 200000"):
        factory.model_from_checkpoint(huge_image_checkpoint, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------------------
# The last resort: an unexpected exception is one line, exit 1, the traceback kept in a file
# ----------------------------------------------------------------------------------------------------------------

def training_argv(run: dict, log_dir, *extra: str) -> list[str]:
    return ["--dataset", "mitstates", "--dataset_path", run["data"], *run["flags"], *execution_flags(log_dir), *extra]


def test_main_internal_error_of_a_resumed_run_goes_to_its_out_log(tirg_lstm_run, tmp_path, monkeypatch, capsys):
    folder = str(tmp_path / "run")
    shutil.copytree(tirg_lstm_run["folder"], folder)
    before = open(os.path.join(folder, "out.log"), encoding="utf-8").read()
    monkeypatch.setattr(main, "train", boom)
    rc = main.main(training_argv(tirg_lstm_run, tmp_path / "unused", "--num_iters", "8", "--resume",
                                 os.path.join(folder, "latest_checkpoint.pth")))
    path = internal_error_file("main.py", capsys.readouterr().err)
    assert rc == 1 and path == os.path.join(folder, "out.log")
    text = assert_traceback_in(path)
    assert text.startswith(before) and ", in _run\n" in text
    assert not os.path.exists(os.path.join(folder, "run.lock"))  # the lock is released


def test_main_internal_error_before_the_first_step_leaves_no_folder(tirg_lstm_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(main, "train", boom)
    rc = main.main(training_argv(tirg_lstm_run, tmp_path / "logs", "--num_iters", "4"))
    path = internal_error_file("main.py", capsys.readouterr().err)
    try:
        assert rc == 1 and os.path.basename(path).startswith("main-traceback-")
        assert_traceback_in(path)
        assert os.listdir(tmp_path / "logs") == []  # the new run folder is removed, as for any failed start
    finally:
        os.remove(path)


def test_main_internal_error_before_the_run_folder_exists(tirg_lstm_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(main, "build_experiment", boom)
    rc = main.main(training_argv(tirg_lstm_run, tmp_path / "logs", "--num_iters", "4"))
    path = internal_error_file("main.py", capsys.readouterr().err)
    try:
        assert rc == 1 and "main-traceback-" in path
        assert ", in _run\n" in assert_traceback_in(path)
    finally:
        os.remove(path)


@pytest.mark.parametrize("program, module, inner, argv", [
    ("retrieve.py", retrieve, "validate", ["--model_checkpoint", "ck.pth", "--gallery", "g", "--image", "a.jpg",
                                           "--text", "red"]),
    ("benchmark.py", benchmark, "run", ["--size", "cpu"]),
    ("sweep.py", sweep, "resolve", ["--seeds", "0", "--", "--dataset", "synthetic"]),
    ("report.py", report, "load_runs", ["some_folder"]),
])
def test_other_entry_points_turn_an_internal_error_into_one_line(program, module, inner, argv, monkeypatch, capsys,
                                                                  tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, inner, boom)
    rc = module.main(argv)
    path = internal_error_file(program, capsys.readouterr().err)
    try:
        assert rc == 1 and os.path.basename(path).startswith(f"{program[:-3]}-traceback-")
        assert ", in main\n" in assert_traceback_in(path)
    finally:
        os.remove(path)


def ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("module, inner, argv, line", [
    (retrieve, "validate", ["--model_checkpoint", "ck.pth", "--gallery", "g", "--image", "a.jpg", "--text", "red"],
     "retrieve.py: interrupted; every output file is as it was or complete"),
    (benchmark, "run", ["--size", "cpu"], "benchmark.py: interrupted; no measurement printed"),
])
def test_ctrl_c_is_one_line_and_exit_130(module, inner, argv, line, monkeypatch, capsys):
    monkeypatch.setattr(module, inner, ctrl_c)
    rc = module.main(argv)
    out, err = capsys.readouterr()
    assert rc == 130 and stderr_lines(err) == [line] and out == ""
