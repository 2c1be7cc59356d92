"""What produced a run's numbers: the command, the code's git state, the library versions, the device and the
number of processes, and when the run started and ended (``session_record``); ``run.json`` in every run folder
holds one such record per process start (a resumed run adds one)."""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Sequence

RUN_FILE = "run.json"
FORMAT = "composeae-run/1"
# The libraries whose versions move the numbers (read from their installed metadata, without importing them).
LIBRARIES = ("torch", "torchvision", "transformers", "numpy")


def file_sha256(path: str) -> str:
    """The SHA-256 of the file's bytes, in hex (read in 1 MiB blocks): which copy of a checkpoint or an index
    file a run used."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_state(folder: str | None = None) -> dict[str, Any] | None:
    """``{"commit": <full hash>, "dirty": bool}`` of the git checkout holding ``folder`` (default: this code's);
    ``dirty``: tracked files differ from the commit. None outside a git checkout or without git."""
    here = folder or os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def commit_label(state: dict[str, Any] | None) -> str | None:
    """A ``git_state`` as args.json writes it: the full hash, with '+changes' when tracked files differ."""
    return None if state is None else state["commit"] + ("+changes" if state.get("dirty") else "")


def library_versions(names: Sequence[str] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each library (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def device_record(device: Any = None) -> dict[str, Any]:
    """The device a run computes on: its name (the GPU's, else the CPU's architecture) and the CUDA and cuDNN
    versions torch was built with and finds (None on a CPU-only build)."""
    import torch

    cuda = torch.version.cuda
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    on_gpu = device is not None and getattr(device, "type", None) == "cuda"
    return {"device": None if device is None else str(device),
            "device_name": torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine(),
            "cuda": cuda, "cudnn": cudnn, "cpu_count": os.cpu_count()}


def now_iso() -> str:
    """The current time as an ISO 8601 string in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def session_record(device: Any = None, processes: int = 1, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """One process start's provenance: the command line (as a shell would take it back), the working folder, the
    git state, Python and the libraries' versions, the device, the number of processes, the host and the start
    time; ``end``, ``wall_s`` and ``status`` are filled in by ``finish``."""
    argv = list(sys.argv if argv is None else argv)
    return {"command": shlex.join([os.path.basename(sys.executable), *argv]), "argv": argv, "cwd": os.getcwd(),
            "git": git_state(), "python": platform.python_version(), "versions": library_versions(),
            **device_record(device), "processes": int(processes), "host": socket.gethostname(),
            "start": now_iso(), "end": None, "wall_s": None, "status": "running", "_t0": time.monotonic()}


def finish(record: dict[str, Any], status: str) -> dict[str, Any]:
    """``record`` ended now with ``status`` ('finished', 'failed', 'interrupted'): its end time and wall seconds."""
    record.update(end=now_iso(), status=status, wall_s=round(time.monotonic() - record["_t0"], 3))
    return record


def public(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` without its private keys (the monotonic start), as run.json holds it."""
    return {k: v for k, v in record.items() if not k.startswith("_")}
