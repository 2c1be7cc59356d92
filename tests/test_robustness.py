"""Faults and bad input: non-finite features and weights, signals, write errors, temp and lock files, unreadable
images, and one clear line (exit 2, before the first step) for every bad flag or file.

Runs use tiny synthetic data (MIT-States layout) on the CPU; see tests/test_main.py for the CLI helpers.
"""
from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import checkpoint
import datasets
import image_cache
import main
import runlog
import selection
import sgd_step
import test_retrieval
import text_model
from datasets import RetrievalTask
from errors import UserInputError
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # test_main's CLI helpers; appended,
# so that the repository's test_retrieval module is not shadowed by tests/test_retrieval.py
from test_main import REPO, cli, error_message, load, metric_lines, one_error_line, only_run_folder, run_cli
from test_checkpoint_faults import tirg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, tiny_mitstates) -> dict:
    """2 iterations, checkpoints at 1 and 2; the copy ``ckpt`` is never written by later tests."""
    log_dir = tmp_path_factory.mktemp("robust_run")
    rc, _ = run_cli(tirg(tiny_mitstates, log_dir, "--num_iters", "2", "--save_every", "1"))
    assert rc == 0
    folder = only_run_folder(log_dir)
    kept = str(log_dir / "kept.pth")
    shutil.copy(os.path.join(folder, "latest_checkpoint.pth"), kept)
    return {"folder": folder, "ckpt": kept}


def leftovers(folder: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*"))
                  if ".tmp" in os.path.basename(p) or os.path.basename(p) == runlog.LOCK_NAME)


def finite_state(path: str) -> bool:
    sd = load(path)["model_state_dict"]
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def strict_json(path: str):
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    with open(path) as f:
        return json.load(f, parse_constant=refuse)


# ------------------------------------------------------------------------------------------------------------------
# 1. Non-finite similarities are never hits (pure functions on hand-made matrices)
def hand_made():
    """3 queries and 3 gallery items in 2-D; query q's relevant item is gallery q; query 1 and gallery 2 are NaN."""
    queries = torch.tensor([[1.0, 0.0], [float("nan"), 1.0], [0.0, 1.0]])  # (3, 2)
    gallery = torch.tensor([[1.0, 0.1], [0.0, 1.0], [float("inf"), 0.0]])  # (3, 2)
    targets = torch.tensor([[0], [1], [2]])  # (Q, V)
    labels = torch.tensor([[0], [1], [2]])  # (G, V)
    return queries, gallery, targets, labels


def test_nonfinite_features_are_refused_with_the_counts():
    queries, gallery, targets, labels = hand_made()
    with pytest.raises(test_retrieval.NonFiniteFeaturesError) as info:
        test_retrieval.first_hit_ranks(queries, gallery, targets, labels)
    assert (info.value.bad_queries, info.value.n_queries, info.value.bad_gallery, info.value.n_gallery) == (1, 3, 1, 3)
    assert "1 of 3 queries and 1 of 3 gallery items" in str(info.value)
    with pytest.raises(test_retrieval.NonFiniteFeaturesError):
        test_retrieval.top_k(queries, gallery, 2)
    # finite features pass
    ok = test_retrieval.first_hit_ranks(queries[[0, 2]], gallery[:2], targets[[0, 1]], labels[:2])
    assert ok.tolist() == [[0], [0]]


def test_nonfinite_features_rank_last_and_are_never_hits(caplog):
    queries, gallery, targets, labels = hand_made()
    caplog.set_level("WARNING")
    ranks = test_retrieval.first_hit_ranks(queries, gallery, targets, labels, nonfinite="rank_last")
    # query 0: hit at rank 0; query 1 (NaN): never a hit (rank G); query 2's only relevant item is the NaN one
    assert ranks.flatten().tolist() == [0, 3, 3]
    assert "1 of 3 queries and 1 of 3 gallery items" in caplog.text
    # the NaN gallery item ranks after every finite one, and is never the hit even of a query it would tie
    targets_all2 = torch.tensor([[2], [2], [1]])
    ranks = test_retrieval.first_hit_ranks(queries, gallery, targets_all2, labels, nonfinite="rank_last")
    assert ranks.flatten().tolist() == [3, 3, 0]
    scores, idx = test_retrieval.top_k(queries, gallery, 3, nonfinite="rank_last")
    assert idx[0].tolist() == [0, 1, 2] and idx[2].tolist() == [1, 0, 2]  # the bad item last
    assert scores[0, 2] == float("-inf") and idx[1].tolist() == [-1, -1, -1] and scores[1].isnan().all()
    task = RetrievalTask(image_keys=[0, 1, 2], gallery=[0, 1, 2], gallery_labels={"x": [0, 1, 2]},
                         query_source=[0, 1, 2], query_text=["a", "b", "c"], query_targets={"x": [0, 1, 2]})
    metrics = test_retrieval.retrieval_metrics(task, queries, gallery, ks=(1, 3), nonfinite="rank_last")
    assert metrics["recall_top1_correct_x"] == pytest.approx(1 / 3)
    assert metrics["recall_top3_correct_x"] == pytest.approx(1 / 3)  # never 1.0


def test_nan_weight_checkpoint_does_not_report_recall(two_step_run, tiny_mitstates, tmp_path, capsys):
    ckpt = torch.load(two_step_run["ckpt"], map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["model_state_dict"].items() if k.endswith("fc.0.weight"))
    ckpt["model_state_dict"][name][0, 0] = float("nan")
    bad = str(tmp_path / "nan.pth")
    torch.save(ckpt, bad)
    rc = main.main(tirg(tiny_mitstates, tmp_path / "logs", "--test_only", "True", "--model_checkpoint", bad))
    out, err = capsys.readouterr()
    assert rc == 1
    line = error_message(err)
    assert re.search(r"features of \d+ of \d+ queries and \d+ of \d+ gallery items are not finite", line), line
    assert not metric_lines(out), "no recall printed for a diverged model"


# ------------------------------------------------------------------------------------------------------------------
# 2-3. The finite-weight guard; strict metrics.json
def test_diverging_learning_rate_leaves_only_finite_files(tiny_mitstates, tmp_path, capsys):
    """ComposeAE at --learning_rate 1e6: BatchNorm's running_var is infinite after iteration 2 while the loss that
    came before the update is finite; nothing non-finite reaches disk, and the line names a finite checkpoint."""
    rc = main.main(cli(tiny_mitstates, tmp_path, "--num_iters", "6", "--learning_rate", "1e6", "--save_every", "1",
                       "--eval_every", "2", "--lstm_dim", "16"))
    err = capsys.readouterr().err
    assert rc == 1
    line = error_message(err)
    assert "not finite" in line
    folder = only_run_folder(tmp_path)
    named = re.search(r"last (?:finite|good) checkpoint is (\S+?);", line).group(1)
    assert os.path.isfile(named) and finite_state(named)
    pths = glob.glob(os.path.join(folder, "*.pth"))
    assert pths and all(finite_state(p) for p in pths)
    if os.path.exists(os.path.join(folder, "metrics.json")):
        strict_json(os.path.join(folder, "metrics.json"))
    assert leftovers(folder) == []


def test_guard_stops_on_a_nonfinite_buffer_before_the_write(tiny_mitstates, tmp_path, monkeypatch, capsys):
    """A finite loss but an infinite BatchNorm buffer after step 3: the checkpoint of step 2 stays and is named."""
    real, calls = sgd_step.train_one_step, {"n": 0}

    def poisoned(model, *a, **kw):
        out = real(model, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(math.inf)
        return out

    monkeypatch.setattr(sgd_step, "train_one_step", poisoned)
    rc = main.main(tirg(tiny_mitstates, tmp_path, "--num_iters", "5", "--save_every", "1"))
    line = error_message(capsys.readouterr().err)
    assert rc == 1
    folder = only_run_folder(tmp_path)
    latest = os.path.join(folder, "latest_checkpoint.pth")
    assert "at iteration 3" in line and "running_var" in line and f"last finite checkpoint is {latest};" in line
    assert load(latest)["it"] == 2 and finite_state(latest)


def test_metrics_json_is_strict(tmp_path):
    path = str(tmp_path / "m.json")
    runlog.write_json(path, {"latest": {"a": math.nan, "b": 0.5, "c": [math.inf, 1]}})
    assert strict_json(path) == {"latest": {"a": None, "b": 0.5, "c": [None, 1]}}
    assert selection.best_score({"test recall_top10_correct_dress": math.nan,
                                 "test recall_top10_correct_shirt": 0.25}, "auto") == 0.25


def test_resuming_nonfinite_weights_is_refused(two_step_run, tiny_mitstates, tmp_path, capsys):
    ckpt = torch.load(two_step_run["ckpt"], map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["model_state_dict"].items() if k.endswith("running_var"))
    ckpt["model_state_dict"][name].fill_(math.inf)
    (tmp_path / "run").mkdir()
    path = str(tmp_path / "run" / "latest_checkpoint.pth")
    torch.save(ckpt, path)
    assert main.main(tirg(tiny_mitstates, tmp_path / "unused", "--num_iters", "4", "--resume", path)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (f"main.py: error: --resume {path}: 1 of its tensors are not finite (e.g. {name}); resume from "
                    f"an earlier checkpoint")
    assert load(path)["it"] == 2


# ------------------------------------------------------------------------------------------------------------------
# 4. Signals
def test_sigint_and_sigterm_save_and_the_printed_command_resumes(tiny_mitstates, tmp_path):
    procs = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for sig in (signal.SIGINT, signal.SIGTERM):
        log_dir = tmp_path / sig.name
        argv = tirg(tiny_mitstates, log_dir, "--num_iters", "100000", "--save_every", "100000")
        err = open(tmp_path / f"{sig.name}.err", "w")
        procs[sig] = (subprocess.Popen([sys.executable, "main.py", *argv], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                       stderr=err), log_dir, err, argv)
    deadline = time.time() + 240
    for sig, (proc, log_dir, _, _) in procs.items():  # training runs: a progress line counts its steps
        while not re.search(r"^iteration [1-9]\d*/100000 ", (tmp_path / f"{sig.name}.err").read_text(), re.M):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        proc.send_signal(sig)
    for sig, (proc, log_dir, err, argv) in procs.items():
        assert proc.wait(timeout=120) == 128 + sig, sig
        err.close()
        text = (tmp_path / f"{sig.name}.err").read_text()
        assert "Traceback" not in text
        last = text.strip().splitlines()[-1]
        m = re.fullmatch(rf"main\.py: {sig.name}: interrupted at iteration (\d+); resume with: (main\.py --resume .*)",
                         last)
        assert m, last
        it, command = int(m.group(1)), shlex.split(m.group(2))
        folder = only_run_folder(log_dir)
        ckpt = os.path.join(folder, "latest_checkpoint.pth")
        assert command[:3] == ["main.py", "--resume", ckpt] and command[3:] == argv
        assert load(ckpt)["it"] == it >= 1
        assert leftovers(folder) == []
        resumed = command[1:]
        resumed[resumed.index("--num_iters") + 1] = str(it + 1)
        assert run_cli(resumed)[0] == 0
        assert load(ckpt)["it"] == it + 1


def test_sigusr1_saves_between_steps_and_exits_138(two_step_run, tiny_mitstates, tmp_path, monkeypatch, capsys):
    real, calls = sgd_step.train_one_step, {"n": 0}

    def step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGUSR1)  # arrives during step 2: training stops after it
        return real(*a, **kw)

    monkeypatch.setattr(sgd_step, "train_one_step", step)
    argv = tirg(tiny_mitstates, tmp_path, "--num_iters", "50", "--save_every", "100")
    rc = main.main(argv)
    err = capsys.readouterr().err
    assert rc == 138 and calls["n"] == 2
    ckpt = os.path.join(only_run_folder(tmp_path), "latest_checkpoint.pth")
    assert err.strip().splitlines()[-1] == (f"main.py: SIGUSR1: interrupted at iteration 2; resume with: "
                                            f"{main.resume_command(argv, ckpt)}")
    assert load(ckpt)["it"] == 2
    with open(os.path.join(only_run_folder(tmp_path), "run.json")) as f:
        (session,) = json.load(f)["sessions"]
    assert session["status"] == "interrupted" and session["end"] is not None  # run.json says how it ended
    assert session["argv"] == ["main.py", *argv]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
    assert main.resume_command(["--resume", "old", "--x", "1", "--resume=o2"], "new") == "main.py --resume new --x 1"


def test_a_second_signal_stops_at_once_without_writing(two_step_run, tiny_mitstates, tmp_path, monkeypatch, capsys):
    real = sgd_step.train_one_step

    def step(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # the first only sets the flag,
        os.kill(os.getpid(), signal.SIGTERM)  # the second stops here, inside the step
        return real(*a, **kw)

    monkeypatch.setattr(sgd_step, "train_one_step", step)
    rc = main.main(tirg(tiny_mitstates, tmp_path, "--num_iters", "50", "--save_every", "1"))
    assert rc == 130
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("main.py: SIGINT: interrupted; stopped without")
    # stopped inside the first step: nothing to resume, so the new run folder is removed as after any failed start
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ------------------------------------------------------------------------------------------------------------------
# 5. Write errors, temp files, the run-folder lock
def test_atomic_write_removes_its_temp_file_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "f.bin")
    checkpoint.atomic_write(path, lambda f: f.write(b"old"))

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        checkpoint.atomic_write(path, full)
    assert os.listdir(tmp_path) == ["f.bin"] and open(path, "rb").read() == b"old"


def test_disk_full_while_saving_names_the_file_and_the_last_good_checkpoint(tiny_mitstates, tmp_path, monkeypatch,
                                                                            capsys):
    real, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", save)
    rc = main.main(tirg(tiny_mitstates, tmp_path, "--num_iters", "3", "--save_every", "1"))
    line = error_message(capsys.readouterr().err)
    monkeypatch.setattr(torch, "save", real)
    folder = only_run_folder(tmp_path)
    latest = os.path.join(folder, "latest_checkpoint.pth")
    assert rc == 1
    assert line == (f"main.py: error: cannot write {latest}: no space left on device; free space or pass --log_dir "
                    f"on another disk; the last checkpoint {latest} is intact")
    assert load(latest)["it"] == 1 and leftovers(folder) == []


def test_a_write_error_in_the_events_names_them(tiny_mitstates, tmp_path, monkeypatch, capsys):
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    rc = main.main(tirg(tiny_mitstates, tmp_path, "--num_iters", "3", "--log_every", "1", "--save_every", "100"))
    line = error_message(capsys.readouterr().err)
    assert rc == 1
    assert line == (f"main.py: error: cannot write the TensorBoard events in {only_run_folder(tmp_path)}: no space "
                    f"left on device; free space or pass --log_dir on another disk; no checkpoint was written yet")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_go_and_live_ones_stay(tmp_path):
    dead, live = dead_pid(), os.getppid()
    for name in (f"latest_checkpoint.pth.tmp{dead}", f"metrics.json.tmp{live}", f"x.u8.tmp-{dead}", "notes.tmp"):
        (tmp_path / name).write_text("x")
    removed = runlog.remove_stale_temp_files(str(tmp_path))
    assert sorted(os.path.basename(p) for p in removed) == [f"latest_checkpoint.pth.tmp{dead}", f"x.u8.tmp-{dead}"]
    assert sorted(os.listdir(tmp_path)) == [f"metrics.json.tmp{live}", "notes.tmp"]


def test_resume_into_a_folder_in_use_is_refused_and_a_stale_lock_is_taken(two_step_run, tiny_mitstates, tmp_path,
                                                                          capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = str(folder / "latest_checkpoint.pth")
    shutil.copy(two_step_run["ckpt"], ckpt)
    lock = folder / runlog.LOCK_NAME
    lock.write_text(f"{runlog.socket.gethostname()} {os.getppid()}\n")  # a live process
    (folder / f"latest_checkpoint.pth.tmp{dead_pid()}").write_bytes(b"torn")
    argv = tirg(tiny_mitstates, tmp_path / "unused", "--num_iters", "3", "--resume", ckpt)
    assert main.main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"in use by process {os.getppid()}" in line and str(lock) in line
    assert load(ckpt)["it"] == 2
    lock.write_text(f"{runlog.socket.gethostname()} {dead_pid()}\n")  # its process ended
    assert run_cli(argv)[0] == 0
    assert load(ckpt)["it"] == 3 and leftovers(str(folder)) == []


# ------------------------------------------------------------------------------------------------------------------
# 6. Unreadable and absurd images
def test_a_training_set_of_unreadable_images_ends_with_one_line(tiny_mitstates, tmp_path, capsys):
    copy = str(tmp_path / "data")
    shutil.copytree(tiny_mitstates, copy)
    trainset = datasets.MITStates(copy, "train", image_size=32)
    for img in trainset.imgs:
        with open(img["file_path"], "wb") as f:
            f.write(b"not a jpeg")
    rc = main.main(tirg(copy, tmp_path / "logs", "--num_iters", "1000"))
    line = error_message(capsys.readouterr().err)
    assert rc == 2
    assert "none of the" in line and "epoch 0" in line and copy in line


def test_an_image_of_absurd_shape_is_skipped_before_decoding(tmp_path):
    path = str(tmp_path / "strip.png")
    Image.new("RGB", (2000, 1)).save(path)
    with pytest.raises(image_cache.BadImageError, match="aspect ratio"):
        image_cache.load_rgb_uint8(path, 224)
    Image.new("RGB", (60, 20)).save(path)  # within the bounds
    assert image_cache.load_rgb_uint8(path, 16).shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------------------------
# 7. One clear line, exit 2, before the first step
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, two_step_run) -> dict:
    root = tmp_path_factory.mktemp("bad_files")
    files = {"empty": root / "empty.pth", "text": root / "weights.txt", "tensor": root / "tensor.pth",
             "list_sd": root / "list_sd.pth", "str_values": root / "str_values.pth", "no_rng": root / "no_rng.pth",
             "bad_opt": root / "bad_opt.pth", "original": root / "original.pth", "a_file": root / "a_file"}
    files["empty"].write_bytes(b"")
    files["text"].write_text("these are not weights\n")
    files["a_file"].write_text("x")
    torch.save(torch.zeros(3), files["tensor"])
    ckpt = torch.load(two_step_run["ckpt"], map_location="cpu", weights_only=False)
    torch.save({**ckpt, "model_state_dict": [1, 2]}, files["list_sd"])
    torch.save({**ckpt, "model_state_dict": {"w": "x"}}, files["str_values"])
    torch.save({k: v for k, v in ckpt.items() if k != "rng"}, files["no_rng"])
    torch.save({**ckpt, "optimizer": [1]}, files["bad_opt"])
    torch.save({"it": 5, "opt": ckpt["opt"], "model_state_dict": ckpt["model_state_dict"]}, files["original"])
    out = {k: str(v) for k, v in files.items()}
    out["ckpt"] = two_step_run["ckpt"]
    return out


@pytest.mark.parametrize("extra, words", [
    (["--image_embed_dim", "0"], ["--image_embed_dim", "positive"]),
    (["--lstm_dim", "-1"], ["--lstm_dim"]),
    (["--learning_rate", "-0.1"], ["--learning_rate", "0 or more"]),
    (["--weight_decay", "-1e-4"], ["--weight_decay"]),
    (["--loader_num_workers", "-1"], ["--loader_num_workers"]),
    (["--train_eval_queries", "-5"], ["--train_eval_queries"]),
    (["--save_every", "-1"], ["--save_every"]),
    (["--eval_every", "-2"], ["--eval_every"]),
    (["--learning_rate", "nan"], ["--learning_rate", "finite"]),
    (["--learning_rate", "inf"], ["--learning_rate", "finite"]),
    (["--loss_weights", "1", "nan", "0.1", "0.01"], ["--loss_weights", "finite"]),
    (["--comment", "/../../escape"], ["--comment", "'/'"]),
    (["--log_dir", "{a_file}/logs"], ["--log_dir", "{a_file}"]),
    (["--image_cache", "{a_file}"], ["--image_cache", "{a_file}"]),
    (["--test_only", "True", "--model_checkpoint", "{empty}"], ["{empty}", "cannot be read"]),
    (["--test_only", "True", "--model_checkpoint", "{list_sd}"], ["'model_state_dict' is a list"]),
    (["--test_only", "True", "--model_checkpoint", "{str_values}"], ["not tensors", "'w'"]),
    (["--resume", "{no_rng}"], ["{no_rng}", "'rng' is missing"]),
    (["--resume", "{bad_opt}"], ["'optimizer' is a list"]),
    (["--resume", "{original}"], ["original code's", "--test_only True --model_checkpoint {original}"]),
    (["--image_weights", "{text}"], ["--image_weights {text}", "cannot read it as a PyTorch file"]),
    (["--image_weights", "{tensor}"], ["--image_weights {tensor}", "holds a Tensor"]),
    (["--image_weights", "{ckpt}"], ["--image_weights {ckpt}", "main.py checkpoint"]),
])
def test_bad_flags_and_files_give_one_line_before_the_first_step(extra, words, tiny_mitstates, tmp_path, bad_files,
                                                                 capsys, monkeypatch):
    started = []
    monkeypatch.setattr(sgd_step, "train_one_step", lambda *a, **kw: started.append(1))
    extra = [x.format(**bad_files) for x in extra]
    rc = main.main(tirg(tiny_mitstates, tmp_path / "logs", "--num_iters", "2") + extra)
    out, err = capsys.readouterr()
    assert rc == 2, err
    line = one_error_line(err)
    for w in words:
        assert w.format(**bad_files) in line, line
    assert not started and not metric_lines(out)
    assert not glob.glob(str(tmp_path / "logs" / "*" / "*.pth"))


def test_read_only_run_folder_on_resume_names_it(two_step_run, tiny_mitstates, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    ckpt = str(folder / "latest_checkpoint.pth")
    shutil.copy(two_step_run["ckpt"], ckpt)
    real_open = os.open

    def read_only(path, flags, *a, **kw):  # as root, chmod does not stop writes: the file system refuses instead
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(runlog.os, "open", read_only)
    assert main.main(tirg(tiny_mitstates, tmp_path / "unused", "--num_iters", "3", "--resume", ckpt)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"cannot write into the run folder {folder} (Read-only file system)" in line


def test_read_only_log_dir_names_it(tiny_mitstates, tmp_path, monkeypatch, capsys):
    log_dir = str(tmp_path / "logs")
    os.makedirs(log_dir)

    def read_only(path, *a, **kw):  # as root, chmod does not stop writes: the file system refuses instead
        raise PermissionError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(runlog.os, "mkdir", read_only)
    assert main.main(tirg(tiny_mitstates, log_dir, "--num_iters", "2")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"main.py: error: --log_dir {log_dir}: cannot create a run folder in it (Read-only file "
                           f"system: {log_dir}/")
    assert os.listdir(log_dir) == []


def test_non_utf8_text_files_and_deep_json_are_named(tmp_path):
    from test_datasets import make_fashion200k

    root = make_fashion200k(tmp_path / "f200k")
    label = os.path.join(root, "labels", "dress_train_detect_all.txt")
    with open(label, "ab") as f:
        f.write("women/dresses/d0.jpg\t0.5\tcaf\xe9 dress\n".encode("latin-1"))
    with pytest.raises(UserInputError, match=re.escape(label) + ".*not UTF-8.*0xe9"):
        datasets.Fashion200k(root, "train", image_size=16)
    queries = os.path.join(root, "test_queries.txt")
    with open(queries, "ab") as f:
        f.write(b"\xff\xfe\n")
    with pytest.raises(UserInputError, match=re.escape(queries) + ".*not UTF-8"):
        datasets.Fashion200k(root, "test", image_size=16)
    deep = tmp_path / "cap.dress.val.json"
    deep.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(UserInputError, match="not valid JSON"):
        datasets.FashionIQ._read_json_list(str(deep))


def test_non_utf8_folder_name_with_bert_is_read_with_a_warning(tiny_bert_32, caplog):
    encoder = text_model.BertTextEncoder(tiny_bert_32)
    name = os.fsdecode(b"red caf\xe9")  # a folder name that is not UTF-8, as os.listdir returns it
    caplog.set_level("WARNING")
    vec = encoder([name])
    assert vec.shape == (1, 32) and torch.isfinite(vec).all()
    assert "not valid UTF-8" in caplog.text


def test_truncated_bert_weights_name_the_folder(tiny_bert_32, tmp_path):
    folder = str(tmp_path / "bert")
    shutil.copytree(tiny_bert_32, folder)
    (weights,) = [f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin"))]
    path = os.path.join(folder, weights)
    with open(path, "rb") as f:
        head = f.read(os.path.getsize(path) // 2)
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(UserInputError, match=f"--bert_model {re.escape(folder)}: cannot load it"):
        text_model.BertTextEncoder(folder)


def test_corrupt_metrics_json_is_moved_aside(tmp_path, caplog):
    (tmp_path / "metrics.json").write_text('{"latest": {"a": 0.1}, "history": [{"it": 2')
    caplog.set_level("WARNING")
    assert runlog.load_history(str(tmp_path)) == []
    (aside,) = glob.glob(str(tmp_path / "metrics.json.corrupt-*"))
    assert "moved it to" in caplog.text and aside in caplog.text
    runlog.write_json(str(tmp_path / "metrics.json"), {"history": [{"it": 1}]})
    assert runlog.load_history(str(tmp_path)) == [{"it": 1}]
