"""Tampered checkpoints and full disks: one line naming the checkpoint and its field (exit 2) for every tampered
field, read once where the checkpoint is read (``checkpoint.read_checkpoint``) or restored
(``checkpoint.restart_from_checkpoint``); one line (exit 1) for a disk that fills while a checkpoint is written or
is full at the start, with the earlier checkpoint intact and no temp file or new run folder left.

The full-disk tests mount a small tmpfs (root only; skipped where mounting is not allowed).
"""
from __future__ import annotations

import copy
import glob
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

import checkpoint
import config
import factory
import main
import runlog
import sgd_step
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # test_main's CLI helpers; appended,
# so that the repository's test_retrieval module is not shadowed by tests/test_retrieval.py
from test_main import cli, error_message, load, one_error_line, only_run_folder, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def tirg(data: str, log_dir, *extra: str) -> list[str]:
    """Flags of a tiny TIRG run (test_main's ``cli``) on ``data``."""
    return cli(data, log_dir, "--model", "tirg", "--loss", "batch_based_classification", "--lstm_dim", "16", *extra)


@pytest.fixture(scope="module")
def good(tmp_path_factory, tiny_mitstates) -> dict:
    """A 2-iteration run's latest checkpoint, loaded as a plain dict (every test tampers with a copy)."""
    log_dir = tmp_path_factory.mktemp("faults_run")
    rc, _ = run_cli(tirg(tiny_mitstates, log_dir, "--num_iters", "2"))
    assert rc == 0
    path = os.path.join(only_run_folder(log_dir), "latest_checkpoint.pth")
    return torch.load(path, map_location="cpu", weights_only=False)


def _drop_last_group(c: dict, with_its_state: bool) -> None:
    group = c["optimizer"]["param_groups"].pop()
    if with_its_state:
        for index in group["params"]:
            c["optimizer"]["state"].pop(index, None)


def _set_rng(key: str, value):
    return lambda c: c["rng"][0].__setitem__(key, value)


# (name, tampering, words the line holds besides the checkpoint's path)
TAMPERED = [
    ("vocab list", lambda c: c.__setitem__("vocab", ["red", "blue"]), ["'vocab' is a list"]),
    ("vocab str ids", lambda c: c.__setitem__("vocab", {w: str(i) for w, i in c["vocab"].items()}), ["'vocab'"]),
    ("vocab id gap", lambda c: c.__setitem__("vocab", {w: i + 1 for w, i in c["vocab"].items()}), ["'vocab'"]),
    ("group missing", lambda c: _drop_last_group(c, False), ["'optimizer'", "a group is missing"]),
    ("group and its state missing", lambda c: _drop_last_group(c, True), ["'optimizer' has 2 parameter groups"]),
    ("group hyperparameter", lambda c: c["optimizer"]["param_groups"][0].__setitem__("momentum", "x"),
     ["'optimizer' param_groups[0]['momentum']"]),
    ("torch rng short", lambda c: c["rng"][0].__setitem__("torch", c["rng"][0]["torch"][:100]),
     ["'rng'[0]['torch']", "100 bytes"]),
    ("torch rng float", lambda c: c["rng"][0].__setitem__("torch", c["rng"][0]["torch"].float()),
     ["'rng'[0]['torch']", "float32"]),
    ("cuda rng size", _set_rng("cuda", [torch.zeros(5, dtype=torch.uint8)]), ["'rng'[0]['cuda'][0]", "5 bytes"]),
    ("cuda rng type", _set_rng("cuda", torch.zeros(16, dtype=torch.uint8)), ["'rng'[0]['cuda']", "not a list"]),
    ("loss rng type", _set_rng("loss", "x"), ["'rng'[0]['loss']"]),
    ("loss rng size", _set_rng("loss", torch.zeros(16, dtype=torch.uint8)), ["'rng' 'loss'", "16 bytes"]),
    ("rng empty", lambda c: c.__setitem__("rng", []), ["'rng'"]),
    ("scheduler keys", lambda c: [c["scheduler"].pop(k) for k in ("last_epoch", "base_lrs")],
     ["'scheduler' lacks 'last_epoch', 'base_lrs'"]),
    ("scheduler lambdas", lambda c: c["scheduler"].pop("lr_lambdas"), ["'scheduler' lacks 'lr_lambdas'"]),
    ("scheduler base_lrs", lambda c: c["scheduler"].__setitem__("base_lrs", [0.01]), ["'scheduler' 'base_lrs'"]),
    ("scheduler last_epoch", lambda c: c["scheduler"].__setitem__("last_epoch", -5), ["'scheduler' 'last_epoch'"]),
    ("momentum shape", lambda c: c["optimizer"]["state"][0].__setitem__("momentum_buffer", torch.zeros(3)),
     ["'momentum_buffer'", "shape (3,)"]),
    ("it huge", lambda c: c.__setitem__("it", 10 ** 30), ["'it' is 1000000000000000000000000000000"]),
    ("it negative", lambda c: c.__setitem__("it", -1), ["'it' is -1"]),
    ("it float", lambda c: c.__setitem__("it", 2.5), ["'it' is 2.5"]),
    ("epoch huge", lambda c: c.__setitem__("epoch", 10 ** 30), ["'epoch'"]),
    ("epoch negative", lambda c: c.__setitem__("epoch", -3), ["'epoch' is -3"]),
    ("batch_in_epoch str", lambda c: c.__setitem__("batch_in_epoch", "4"), ["'batch_in_epoch' is '4'"]),
    ("best str", lambda c: c.__setitem__("best", "x"), ["'best' is 'x'"]),
    ("best nan", lambda c: c.__setitem__("best", float("nan")), ["'best' is nan"]),
    ("best int", lambda c: c.__setitem__("best", 1), ["'best' is 1"]),
]


def tampered(good: dict, folder, change) -> str:
    c = copy.deepcopy(good)
    change(c)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(str(folder), "latest_checkpoint.pth")
    torch.save(c, path)
    return path


@pytest.mark.parametrize("name, change, words", TAMPERED, ids=[t[0] for t in TAMPERED])
def test_resuming_a_tampered_checkpoint_gives_one_line(name, change, words, good, tiny_mitstates, tmp_path, monkeypatch,
                                                       capsys):
    path = tampered(good, tmp_path / "run", change)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    started = []
    monkeypatch.setattr(sgd_step, "train_one_step", lambda *a, **kw: started.append(1))
    rc = main.main(tirg(tiny_mitstates, tmp_path / "unused", "--num_iters", "4", "--resume", path))
    line = one_error_line(capsys.readouterr().err)  # exactly one stderr line, no traceback
    assert rc == 2
    assert line.startswith(f"main.py: error: checkpoint {path}: "), line
    for w in words:
        assert w in line, line
    assert not started and os.listdir(tmp_path / "run") == ["latest_checkpoint.pth"]
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest


@pytest.mark.parametrize("name", ["vocab list", "vocab str ids", "vocab id gap", "it huge"])
def test_evaluating_a_checkpoint_with_a_tampered_field_it_reads_gives_one_line(name, good, tiny_mitstates, tmp_path,
                                                                               capsys):
    _, change, words = next(t for t in TAMPERED if t[0] == name)
    path = tampered(good, tmp_path / "run", change)
    rc = main.main(tirg(tiny_mitstates, tmp_path / "logs", "--test_only", "True", "--model_checkpoint", path))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2
    assert line.startswith(f"main.py: error: checkpoint {path}: "), line
    for w in words:
        assert w in line, line
    assert not os.path.exists(tmp_path / "logs") or os.listdir(tmp_path / "logs") == []


def test_evaluation_ignores_the_training_state_it_does_not_read(good, tiny_mitstates, tmp_path, run_main):
    """--test_only reads the weights, the vocabulary and the iteration: a tampered schedule does not stop it."""
    path = tampered(good, tmp_path / "run", lambda c: c["scheduler"].pop("last_epoch"))
    rc, out = run_main(tirg(tiny_mitstates, tmp_path / "logs", "--test_only", "True", "--model_checkpoint", path))
    assert rc == 0 and "test recall_top1_correct_composition" in out


def test_restart_returns_the_state_train_continues_from(good, tiny_mitstates, tmp_path):
    """restart_from_checkpoint restores the optimizer, the schedule and the random state, and returns where the
    run stands; the weights are factory.build_experiment's to load."""
    args = config.resolve_defaults(config.parse_args(tirg(tiny_mitstates, tmp_path))[0])
    exp = factory.build_experiment(args, torch.device("cpu"), good, "x.pth")
    torch.manual_seed(123)  # the checkpoint's state replaces this one
    state = checkpoint.restart_from_checkpoint(good, "x.pth", model=exp.model, optimizer=exp.optimizer,
                                               scheduler=exp.scheduler)
    assert state == {"it": 2, "epoch": good["epoch"], "batch_in_epoch": good["batch_in_epoch"], "best": good["best"]}
    assert torch.equal(torch.get_rng_state(), good["rng"][0]["torch"])
    assert exp.scheduler.last_epoch == good["scheduler"]["last_epoch"] == 2
    saved = good["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(exp.optimizer.state_dict()["state"][0]["momentum_buffer"], saved)


# ------------------------------------------------------------------------------------------------------------------
# Full disks
@pytest.fixture
def tmpfs(tmp_path):
    """A 256 MiB tmpfs (two checkpoints of the tiny runs fit), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot run mount here: {exc}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False, timeout=30)


def fill(disk, leave: int = 0) -> None:
    """Takes all but ``leave`` bytes of the file system's free space (one preallocated file: instant on tmpfs)."""
    st = os.statvfs(disk)
    fd = os.open(os.path.join(str(disk), "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - leave)
    finally:
        os.close(fd)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_torch_writer_failing_on_a_full_disk_is_named_as_one(tmpfs):
    """torch.save reports a full disk as a RuntimeError ('unexpected pos'): atomic_write names it, removes its temp
    file and leaves the earlier file."""
    path = str(tmpfs / "w.pth")
    checkpoint.save_checkpoint(path, {"w": torch.ones(10)})
    before = sha256(path)
    fill(tmpfs)
    with pytest.raises(checkpoint.WriteFailed) as info:
        checkpoint.save_checkpoint(path, {"w": torch.zeros(1 << 20)})
    assert str(info.value) == f"cannot write {path}: no space left on device; the file there is unchanged"
    assert isinstance(info.value, OSError)
    assert sha256(path) == before and sorted(os.listdir(tmpfs)) == ["filler", "w.pth"]


def test_a_disk_filling_while_a_checkpoint_is_written_keeps_the_last_one(tiny_mitstates, tmpfs, monkeypatch, capsys):
    real, before = runlog.save_checkpoint, {}

    def save(path, state, *a, **kw):
        if os.path.exists(path):  # the second latest_checkpoint.pth: the disk fills before it is written
            before[path] = sha256(path)
            fill(tmpfs, leave=1 << 20)
        return real(path, state, *a, **kw)

    monkeypatch.setattr(runlog, "save_checkpoint", save)
    rc = main.main(tirg(tiny_mitstates, tmpfs / "logs", "--num_iters", "3", "--save_every", "1"))
    line = error_message(capsys.readouterr().err)  # one error line among the progress bars, no traceback
    folder = only_run_folder(tmpfs / "logs")
    latest = os.path.join(folder, "latest_checkpoint.pth")
    assert rc == 1
    assert line == (f"main.py: error: cannot write {latest}: no space left on device; free space or pass --log_dir "
                    f"on another disk; the last checkpoint {latest} is intact")
    assert list(before) == [latest] and sha256(latest) == before[latest] and load(latest)["it"] == 1
    assert not glob.glob(os.path.join(folder, "*.tmp*")) and not os.path.exists(os.path.join(folder, "run.lock"))


def test_a_disk_full_at_the_start_leaves_no_run_folder(tiny_mitstates, tmpfs, capsys):
    logs = tmpfs / "logs"
    logs.mkdir()
    fill(tmpfs)
    rc = main.main(tirg(tiny_mitstates, logs, "--num_iters", "2"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1
    assert re.fullmatch(rf"main\.py: error: cannot write {re.escape(str(logs))}/[^/]+/run\.lock: no space left on "
                        rf"device; free space or pass --log_dir on another disk", line), line
    assert os.listdir(logs) == []


def test_a_resumed_run_on_a_full_disk_keeps_its_folder(good, tiny_mitstates, tmpfs, capsys):
    folder = tmpfs / "run"
    path = tampered(good, folder, lambda c: None)
    digest = sha256(path)
    fill(tmpfs)
    rc = main.main(tirg(tiny_mitstates, tmpfs / "unused", "--num_iters", "4", "--resume", path))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1
    assert line == (f"main.py: error: cannot write {folder / 'run.lock'}: no space left on device; free space; the "
                    f"last checkpoint {path} is intact")
    assert os.listdir(folder) == ["latest_checkpoint.pth"] and sha256(path) == digest
