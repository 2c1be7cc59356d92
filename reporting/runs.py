"""Run folders as report.py reads them: every ``metrics.json`` below a folder with the ``args.json`` beside it, the
runs grouped by their settings, and the mean and sample standard deviation of each metric over a group's seeds."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import statistics

import provenance
from errors import UserInputError

_METRIC = re.compile(r"^(\w+) recall_top(\d+)_correct_(\w+)$")  # '<split> recall_top<k>_correct_<view>'


@dataclasses.dataclass
class RunRecord:
    """One run folder: its resolved flags (``args.json`` 'args') and its ``metrics.json``."""

    folder: str
    args: dict
    metrics: dict
    run_file: dict = dataclasses.field(default_factory=dict)  # run.json (provenance.py); {} where absent

    @property
    def seed(self):
        return self.args.get("seed")

    @property
    def history(self) -> list[dict]:
        return [h for h in self.metrics.get("history", []) if isinstance(h, dict)]

    @property
    def latest(self) -> dict:
        """The last evaluation (metrics.json 'latest'), with the derived means of ``derived_means``."""
        return derived_means(self.metrics.get("latest") or {})

    @property
    def latest_it(self) -> int | None:
        return (self.metrics.get("latest") or {}).get("it")

    def best_entry(self) -> dict:
        """The evaluation of the selected checkpoint (metrics.json 'best'): the last history entry of its iteration
        that holds test metrics (with --select_on val, the test evaluation of best_checkpoint.pth); {} without
        one."""
        best = self.metrics.get("best")
        if not isinstance(best, dict) or "it" not in best:
            return {}
        entries = [h for h in self.history if h.get("it") == best["it"] and any(k.startswith("test ") for k in h)]
        return derived_means(entries[-1]) if entries else {}


def split_metric(name: str) -> tuple[str, int, str] | None:
    """'test recall_top10_correct_adj' -> ('test', 10, 'adj'); None for another name."""
    m = _METRIC.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def derived_means(metrics: dict) -> dict:
    """``metrics`` with ``<split> recall_top<k>_correct_mean`` added for each split and k whose views hold no
    'composition' (Fashion IQ's categories) and no mean yet: the mean of their finite values, the number ComposeAE
    reports (as runlog.headline_recall)."""
    per_k: dict[tuple[str, int], dict[str, float]] = {}
    for name, value in metrics.items():
        parts = split_metric(name)
        if parts and isinstance(value, (int, float)) and not isinstance(value, bool):
            per_k.setdefault(parts[:2], {})[parts[2]] = float(value)
    out = dict(metrics)
    for (split, k), views in per_k.items():
        finite = [v for v in views.values() if math.isfinite(v)]
        if "composition" not in views and "mean" not in views and finite:
            out[f"{split} recall_top{k}_correct_mean"] = sum(finite) / len(finite)
    return out


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def read_run(folder: str) -> RunRecord:
    """The run in ``folder``; ValueError naming what is wrong with its metrics.json or args.json."""
    try:
        metrics = _read_json(os.path.join(folder, "metrics.json"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"metrics.json is unreadable ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(metrics.get("latest"), dict) or not isinstance(metrics.get("history"), list):
        raise ValueError("metrics.json lacks 'latest' or 'history'")
    try:
        record = _read_json(os.path.join(folder, "args.json"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ValueError(f"args.json is missing or unreadable ({type(exc).__name__}), so its settings are "
                         f"unknown") from None
    if not isinstance(record.get("args"), dict):
        raise ValueError("args.json lacks 'args'")
    try:
        run_file = _read_json(os.path.join(folder, provenance.RUN_FILE))
    except (OSError, ValueError, RecursionError):
        run_file = {}  # a run written before run.json existed, or a torn file: its provenance is unknown
    return RunRecord(folder=folder, args=record["args"], metrics=metrics, run_file=run_file)


def group_provenance(runs: list[RunRecord]) -> dict:
    """What produced a group's runs, from their run.json sessions: the distinct git commits (with '+changes' for a
    tree with uncommitted changes), library versions and devices, and the runs with no run.json or with sessions
    before it began (a folder trained without run.json, then resumed)."""
    commits, versions, devices, unknown = [], [], [], []
    for run in runs:
        sessions = [s for s in run.run_file.get("sessions", []) if isinstance(s, dict)]
        if not sessions or run.run_file.get("earlier_sessions_unknown"):  # (some of) its iterations: unknown code
            unknown.append(run.folder)
        for session in sessions:
            git = session.get("git")
            label = provenance.commit_label(git) if isinstance(git, dict) and git.get("commit") else \
                "not a git checkout"
            for seen, value in ((commits, label), (devices, session.get("device_name")),
                                (versions, json.dumps(session.get("versions"), sort_keys=True))):
                if value not in seen:
                    seen.append(value)
    return {"git_commits": commits, "versions": [json.loads(v) for v in versions], "devices": devices,
            "runs_without_run_json": unknown}


def find_run_folders(folder: str) -> list[str]:
    """Every folder at or below ``folder`` that holds a metrics.json, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if "metrics.json" in files:
            found.append(root)
    return sorted(found)


def load_runs(folders: list[str], warn) -> list[RunRecord]:
    """The runs below ``folders`` (each once). A run that cannot be read is skipped with ``warn(line)`` when
    others can; evaluations of a checkpoint (``--test_only`` folders) are skipped with a line too. UserInputError
    for a missing folder, a folder without metrics.json below it, or no readable run at all."""
    paths: list[str] = []
    for folder in folders:
        if not os.path.isdir(folder):
            raise UserInputError(f"{folder}: no such folder; pass a run folder or a folder above run folders "
                                 f"(e.g. a sweep's)")
        below = find_run_folders(folder)
        if not below:
            raise UserInputError(f"{folder}: no metrics.json below it; pass a folder that holds runs written by "
                                 f"main.py (or sweep.py)")
        paths += [p for p in below if os.path.realpath(p) not in {os.path.realpath(q) for q in paths}]
    runs, bad = [], []
    for path in paths:
        try:
            run = read_run(path)
        except ValueError as exc:
            bad.append(f"{path}: {exc}")
            continue
        if run.args.get("test_only"):
            warn(f"skipped {path}: an evaluation of a checkpoint (--test_only), not a training run")
            continue
        runs.append(run)
    if not runs:
        raise UserInputError(f"no readable run below {', '.join(folders)}: {'; '.join(bad) or 'only evaluations'}"
                             f"; fix or remove the broken files")
    for line in bad:
        warn(f"skipped {line}")
    return runs


def _key(value) -> str:
    return json.dumps(value, sort_keys=True)


def group_runs(runs: list[RunRecord], keys: tuple[str, ...], warn) -> list[list[RunRecord]]:
    """The runs grouped by their values of ``keys`` (runs that differ only in other flags, e.g. the seed, share a
    group), groups and runs in the order first seen; of two runs of one group with the same seed the one with the
    later last evaluation is kept (``warn`` names the other)."""
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(_key({k: run.args.get(k) for k in keys}), []).append(run)
    out = []
    for members in groups.values():
        by_seed: dict[str, RunRecord] = {}
        for run in members:
            seed = _key(run.seed)
            other = by_seed.get(seed)
            if other is None:
                by_seed[seed] = run
                continue
            keep, drop = sorted([other, run], key=lambda r: (r.latest_it or -1))[::-1]
            warn(f"two runs of seed {run.seed} with the same settings: kept {keep.folder} (iteration "
                 f"{keep.latest_it}), left out {drop.folder} (iteration {drop.latest_it})")
            by_seed[seed] = keep
        out.append(sorted(by_seed.values(), key=lambda r: (not isinstance(r.seed, int), r.seed
                                                           if isinstance(r.seed, int) else 0, r.folder)))
    return out


def summarize(values_per_run: list[dict]) -> dict[str, dict]:
    """``{metric: {"mean", "sd", "n", "values"}}`` over the runs' metric dicts: the mean and the sample standard
    deviation (n - 1; None for n = 1) of the finite values; metrics in first-seen order, 'it' left out."""
    names: list[str] = []
    for metrics in values_per_run:
        names += [n for n in metrics if n != "it" and n not in names]
    out = {}
    for name in names:
        values = [float(m[name]) for m in values_per_run if isinstance(m.get(name), (int, float))
                  and not isinstance(m.get(name), bool) and math.isfinite(m[name])]
        if not values:
            continue
        out[name] = {"mean": statistics.mean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
                     "n": len(values), "values": values}
    return out


def headline_metric(names, split: str, k: int) -> str | None:
    """The name of ``split``'s recall@k that a report leads with: the composition view (MIT-States,
    Fashion200k, CSS3D, CIRR), else the mean over Fashion IQ's categories; None when neither is present."""
    for view in ("composition", "mean"):
        name = f"{split} recall_top{k}_correct_{view}"
        if name in names:
            return name
    return None
