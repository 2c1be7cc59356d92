"""``--mode default``: ``python main.py`` with no flags (the embedded default: synthetic data generated on first use
into ``data/synthetic``, ComposeAE + the packaged MiniLM text model, CPU), timed as a first run.

Each seed runs ``main.py --seed N`` as a subprocess whose working directory is a new empty temporary folder, so the
data generation, the model loading and every start-up import are inside the measurement, as on a fresh clone. The
result of a seed is one JSON line: wall time, the child's CPU time (user + sys, ``RUSAGE_CHILDREN``), the torch
threads, the final test R@1 (``test recall_top1_correct_composition`` of ``metrics.json``'s latest evaluation),
the iterations and the machine (CPU count, model name, 1-minute load average when it started).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import torch

import config
from errors import UserInputError

MAIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py")
R1 = "test recall_top1_correct_composition"  # the metric a default run is judged by


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2`` as a list of ints; anything else is a UserInputError."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise UserInputError(f"--seeds {text!r}: use comma-separated non-negative integers, e.g. --seeds 0,1,2")
    return seeds


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def children_cpu_s() -> float:
    """User + sys CPU seconds of the finished children of this process so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main_command(seed: int, threads: int, extra: list[str]) -> list[str]:
    """The child's command: main.py by absolute path, ``--seed``, ``--threads`` where main.py has that flag and
    ``--threads`` is set, then ``extra`` (main.py flags; none for the default run)."""
    cmd = [sys.executable, MAIN, "--seed", str(seed)]
    if threads and not config.get_args_parser().parse_known_args(["--threads", str(threads)])[1]:
        cmd += ["--threads", str(threads)]
    return cmd + extra


def final_metrics(folder: str) -> tuple[dict, dict]:
    """``(latest evaluation, resolved flags)`` of the one run folder under ``<folder>/logs`` (main.py's default
    --log_dir): ``metrics.json``'s latest entry and ``args.json``'s args."""
    logs = os.path.join(folder, "logs")
    runs = sorted(os.listdir(logs)) if os.path.isdir(logs) else []
    for run in runs:
        path = os.path.join(logs, run, "metrics.json")
        if os.path.isfile(path):
            with open(path) as f, open(os.path.join(logs, run, "args.json")) as g:
                return json.load(f)["latest"], json.load(g)["args"]
    raise RuntimeError(f"main.py wrote no metrics.json under {logs}")


def run_seed(seed: int, threads: int, extra: list[str]) -> dict:
    """Runs the default for one seed in a fresh temporary folder; returns its result (see the module)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = main_command(seed, threads, extra)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="default_run-") as folder:
        log_path = os.path.join(folder, "main.log")
        cpu0, t0 = children_cpu_s(), time.monotonic()
        with open(log_path, "w") as log:
            rc = subprocess.call(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        wall, cpu = time.monotonic() - t0, children_cpu_s() - cpu0
        if rc != 0:
            with open(log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}; its output ends:\n{tail}")
        latest, run_args = final_metrics(folder)
    return {"mode": "default", "seed": seed, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "threads": run_args.get("threads") or torch.get_num_threads(), "test_recall_at_1": latest[R1],
            "iterations": int(latest["it"]), "main_flags": extra,
            "machine": {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "load_avg_1m": round(load, 2)},
            "command": shlex.join(["python", "main.py", *cmd[2:]])}


def default_main(a: argparse.Namespace) -> Iterator[dict]:
    """``benchmark.py --mode default``: one result per seed of ``--seeds``, in order, each as soon as it is done."""
    seeds = parse_seeds(a.seeds)
    if a.threads < 0:
        raise UserInputError(f"--threads {a.threads}: use 0 (torch's default) or a positive count")
    extra = shlex.split(a.main_flags)
    for seed in seeds:
        yield run_seed(seed, a.threads, extra)
