"""checksums.sha256 in a run folder: its format (``sha256sum -c``), a save killed at each of its steps, and the
check of a checkpoint against it by --test_only, --resume, retrieve.py and demo.py (``--ignore_checksum``)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch

import config
import demo
import retrieve
from checkpoint import save_checkpoint
from checksums import CHECKSUMS_NAME, ChecksumFile, verify_checkpoint
from errors import UserInputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA256SUM = shutil.which("sha256sum")
needs_sha256sum = pytest.mark.skipif(SHA256SUM is None, reason="no sha256sum binary on this machine")


def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def sha256sum_check(folder) -> subprocess.CompletedProcess:
    return subprocess.run([SHA256SUM, "-c", CHECKSUMS_NAME], cwd=str(folder), capture_output=True, text=True)


def listed(folder) -> list[str]:
    with open(os.path.join(str(folder), CHECKSUMS_NAME)) as f:
        return f.read().splitlines()


# ------------------------------------------------------------------------------------------------------------------
# The file and the save protocol
def test_a_save_lists_the_bytes_written_in_sha256sums_format(tmp_path):
    path = str(tmp_path / "latest_checkpoint.pth")
    first = save_checkpoint(path, {"w": torch.arange(10.0)}, checksums=ChecksumFile(str(tmp_path)))
    assert first == sha256(path)  # hashed while writing: the bytes on disk
    best = save_checkpoint(str(tmp_path / "best_checkpoint.pth"), {"w": torch.ones(3)},
                           checksums=ChecksumFile(str(tmp_path)))
    second = save_checkpoint(path, {"w": torch.zeros(10)}, checksums=ChecksumFile(str(tmp_path)))
    assert second == sha256(path) != first
    # one line per name, two spaces, the stale digest of the re-saved name dropped, the order kept
    assert listed(tmp_path) == [f"{second}  latest_checkpoint.pth", f"{best}  best_checkpoint.pth"]
    assert sorted(os.listdir(tmp_path)) == ["best_checkpoint.pth", CHECKSUMS_NAME, "latest_checkpoint.pth"]


@needs_sha256sum
def test_sha256sum_checks_the_file_and_catches_a_change(tmp_path):
    for name in ("latest_checkpoint.pth", "best_checkpoint.pth", "latest_checkpoint.pth"):
        save_checkpoint(str(tmp_path / name), {"w": torch.randn(50)}, checksums=ChecksumFile(str(tmp_path)))
    done = sha256sum_check(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(done.stdout.splitlines()) == ["best_checkpoint.pth: OK", "latest_checkpoint.pth: OK"]
    torch.save({"w": torch.randn(50)}, str(tmp_path / "best_checkpoint.pth"))
    assert sha256sum_check(tmp_path).returncode == 1


CHILD = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import torch
import checkpoint, checksums
folder, step, legacy = sys.argv[1], sys.argv[2], sys.argv[3] == "legacy"
path = os.path.join(folder, "latest_checkpoint.pth")
if legacy:  # a checkpoint written before its folder had a checksums file
    torch.save({{"v": torch.zeros(100)}}, path)
else:
    checkpoint.save_checkpoint(path, {{"v": torch.zeros(100)}}, checksums=checksums.ChecksumFile(folder))
checksums._AFTER_STEP = lambda done: os.kill(os.getpid(), signal.SIGKILL) if done == step else None
checkpoint.save_checkpoint(path, {{"v": torch.ones(100)}}, checksums=checksums.ChecksumFile(folder))
"""
STEPS = [("temp written", "old"), ("checksum added", "old"), ("renamed", "new"), ("stale dropped", "new")]


@pytest.mark.parametrize("step, left, legacy", [(*s, "") for s in STEPS] + [("checksum added", "old", "legacy")],
                         ids=[s for s, _ in STEPS] + ["checksum added, unlisted old file"])
def test_a_save_killed_at_any_step_leaves_an_accepted_checkpoint(tmp_path, step, left, legacy):
    done = subprocess.run([sys.executable, "-c", CHILD.format(repo=REPO), str(tmp_path), step, legacy],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    path = str(tmp_path / "latest_checkpoint.pth")
    value = torch.load(path, weights_only=True)["v"]
    assert torch.equal(value, torch.zeros(100) if left == "old" else torch.ones(100))
    assert verify_checkpoint(path) == sha256(path)  # accepted, not refused
    lines = [line for line in listed(tmp_path) if line.endswith("  latest_checkpoint.pth")]
    assert len(lines) == (1 if step in ("temp written", "stale dropped") else 2)  # two lines between the steps
    if step == "stale dropped" and SHA256SUM:
        assert sha256sum_check(tmp_path).returncode == 0


def test_verify_accepts_unlisted_names_and_refuses_a_changed_file_in_one_line(tmp_path, caplog):
    path = str(tmp_path / "latest_checkpoint.pth")
    torch.save({"w": torch.ones(4)}, path)
    assert verify_checkpoint(path) == sha256(path)  # no checksums file
    assert verify_checkpoint(str(tmp_path / "missing.pth")) is None  # the reader says it is missing
    written = save_checkpoint(str(tmp_path / "best_checkpoint.pth"), {"w": torch.ones(4)},
                              checksums=ChecksumFile(str(tmp_path)))
    assert verify_checkpoint(path) == sha256(path)  # a checksums file that does not list the name
    best = str(tmp_path / "best_checkpoint.pth")
    torch.save({"w": torch.full((4,), 2.0)}, best)
    with pytest.raises(UserInputError) as info:
        verify_checkpoint(best)
    assert str(info.value) == (f"checkpoint {best}: SHA-256 {sha256(best)} does not match {CHECKSUMS_NAME} "
                               f"({written}); it changed after it was written: pass --ignore_checksum True to use "
                               f"it anyway")
    with caplog.at_level(logging.WARNING, logger="checksums"):
        assert verify_checkpoint(best, ignore=True) == sha256(best)
    assert [r.getMessage() for r in caplog.records] == [
        f"{str(info.value).split(': pass')[0]}; used anyway (--ignore_checksum True)"]


# ------------------------------------------------------------------------------------------------------------------
# A training run, --test_only, --resume, retrieve.py and demo.py
@needs_sha256sum
def test_sha256sum_passes_in_a_trained_run_folder(tirg_lstm_run):
    folder = tirg_lstm_run["folder"]
    assert sorted(line.split("  ")[1] for line in listed(folder)) == ["best_checkpoint.pth", "latest_checkpoint.pth"]
    done = sha256sum_check(folder)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def changed_run(tirg_lstm_run, tmp_path) -> dict:
    """A copy of the trained run whose latest_checkpoint.pth had a weight changed and was saved again under its
    name with torch.save (checksums.sha256 untouched)."""
    folder = str(tmp_path / "run")
    shutil.copytree(tirg_lstm_run["folder"], folder)
    path = os.path.join(folder, "latest_checkpoint.pth")
    listed_digest = sha256(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    key = next(k for k, v in ckpt["model_state_dict"].items() if v.is_floating_point())
    ckpt["model_state_dict"][key] = ckpt["model_state_dict"][key] + 0.25
    torch.save(ckpt, path)
    return {"folder": folder, "path": path, "listed": listed_digest, "data": tirg_lstm_run["data"]}


def refusal(path: str, listed_digest: str, prog: str) -> str:
    return (f"{prog}: error: checkpoint {path}: SHA-256 {sha256(path)} does not match {CHECKSUMS_NAME} "
            f"({listed_digest}); it changed after it was written: pass --ignore_checksum True to use it anyway")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line]


def test_test_only_refuses_a_changed_checkpoint_and_ignore_checksum_evaluates_it(changed_run, run_main_cli,
                                                                              tmp_path):
    flags = ["--dataset", "mitstates", "--dataset_path", changed_run["data"], "--test_only", "True",
             "--model_checkpoint", changed_run["path"], "--device", "cpu", "--loader_num_workers", "0"]
    rc, _, err = run_main_cli(flags + ["--log_dir", str(tmp_path / "refused")])
    assert rc == 2 and error_lines(err) == [refusal(changed_run["path"], changed_run["listed"], "main.py")]
    assert not os.path.exists(tmp_path / "refused")  # refused before a run folder exists
    rc, _, err = run_main_cli(flags + ["--log_dir", str(tmp_path / "used"), "--ignore_checksum", "True"])
    assert rc == 0, err
    ((folder,),) = [os.listdir(tmp_path / "used")]
    with open(tmp_path / "used" / folder / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["checkpoint_sha256"] == sha256(changed_run["path"]) != changed_run["listed"]
    assert metrics["checkpoint"] == os.path.abspath(changed_run["path"])


def test_test_only_records_the_verified_sha256_of_a_good_checkpoint(tirg_lstm_run, run_main_cli, tmp_path):
    best = os.path.join(tirg_lstm_run["folder"], "best_checkpoint.pth")
    rc, _, err = run_main_cli(["--dataset", "mitstates", "--dataset_path", tirg_lstm_run["data"], "--test_only",
                               "--model_checkpoint", best, "--device", "cpu", "--loader_num_workers", "0",
                               "--log_dir", str(tmp_path)])
    assert rc == 0, err
    ((folder,),) = [os.listdir(tmp_path)]
    with open(tmp_path / folder / "metrics.json") as f:
        metrics = json.load(f)
    assert f"{metrics['checkpoint_sha256']}  best_checkpoint.pth" in listed(tirg_lstm_run["folder"])
    assert metrics["checkpoint_sha256"] == sha256(best) and metrics["checkpoint"] == os.path.abspath(best)


def test_resume_refuses_a_changed_checkpoint(changed_run, run_main_cli):
    before = sorted(os.listdir(changed_run["folder"]))
    rc, _, err = run_main_cli(["--dataset", "mitstates", "--dataset_path", changed_run["data"], "--resume",
                               changed_run["path"], "--num_iters", "6", "--device", "cpu"])
    assert rc == 2 and error_lines(err) == [refusal(changed_run["path"], changed_run["listed"], "main.py")]
    assert sorted(os.listdir(changed_run["folder"])) == before


def test_ignore_checksum_is_no_run_setting():
    assert "ignore_checksum" not in config.RUN_SETTINGS + config.OBSERVATION_SETTINGS
    assert config.parse_args(["--ignore_checksum"])[0].ignore_checksum is True
    assert config.parse_args([])[0].ignore_checksum is False


def test_retrieve_refuses_a_changed_checkpoint_and_ignore_checksum_uses_it(changed_run, tmp_path):
    gallery = os.path.join(changed_run["data"], "images")
    image = os.path.join(gallery, sorted(os.listdir(gallery))[0], sorted(os.listdir(
        os.path.join(gallery, sorted(os.listdir(gallery))[0])))[0])
    argv = ["--model_checkpoint", changed_run["path"], "--gallery", gallery, "--image", image, "--text", "red",
            "--device", "cpu", "--top_k", "3", "--json", str(tmp_path / "r.jsonl")]

    def call(*extra):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = retrieve.main(argv + list(extra))
        return rc, err.getvalue()

    rc, err = call()
    assert rc == 2 and err.splitlines() == [refusal(changed_run["path"], changed_run["listed"], "retrieve.py")]
    assert not os.path.exists(tmp_path / "r.jsonl")
    rc, err = call("--ignore_checksum", "True")
    assert rc == 0, err
    with open(tmp_path / "r.jsonl") as f:
        assert len(json.load(f)["results"]) == 3


def test_demo_refuses_a_changed_checkpoint(changed_run):
    with socket.socket() as s:  # a free port: demo.py checks that it can listen before it loads the model
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = demo.get_args_parser().parse_args(["--model_checkpoint", changed_run["path"], "--gallery",
                                              os.path.join(changed_run["data"], "images"), "--device", "cpu",
                                              "--port", str(port)])
    with pytest.raises(UserInputError) as info:
        demo.build_state(args)
    assert f"demo.py: error: {info.value}" == refusal(changed_run["path"], changed_run["listed"], "demo.py")
    assert demo.get_args_parser().parse_args(["--model_checkpoint", "x", "--gallery", "g",
                                              "--ignore_checksum", "True"]).ignore_checksum is True


def test_a_checkpoint_replaced_between_hash_and_read_is_hashed_again(tmp_path):
    from checksums import read_verified

    folder = tmp_path / "run"
    folder.mkdir()
    path = str(folder / "latest_checkpoint.pth")
    checksums = ChecksumFile(str(folder))
    first = save_checkpoint(path, {"w": torch.zeros(3)}, checksums=checksums)
    reads = []

    def read():  # a training run renames its next checkpoint into place while the first read runs
        reads.append(torch.load(path)["w"].clone())
        if len(reads) == 1:
            save_checkpoint(path, {"w": torch.ones(3)}, checksums=checksums)
        return reads[-1]

    digest, weights = read_verified(path, False, read)
    assert len(reads) == 2 and torch.equal(weights, torch.ones(3))
    assert digest == sha256(path) != first  # the digest of the weights returned


def test_a_link_to_a_checkpoint_is_checked_against_its_run_folder(tmp_path):
    folder, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    path = str(folder / "best_checkpoint.pth")
    save_checkpoint(path, {"w": torch.zeros(3)}, checksums=ChecksumFile(str(folder)))
    torch.save({"w": torch.ones(3)}, path)  # changed after it was written
    os.symlink(path, elsewhere / "model.pth")
    with pytest.raises(UserInputError, match="does not match checksums.sha256"):
        verify_checkpoint(str(elsewhere / "model.pth"))


def test_a_checksums_file_with_a_byte_order_mark_keeps_its_first_line(tmp_path):
    path = tmp_path / "latest_checkpoint.pth"
    torch.save({"w": torch.zeros(3)}, str(path))
    (tmp_path / CHECKSUMS_NAME).write_bytes(b"\xef\xbb\xbf" + f"{'0' * 64}  latest_checkpoint.pth\n".encode())
    with pytest.raises(UserInputError, match="does not match"):
        verify_checkpoint(str(path))
