"""report.py's PNG plots (matplotlib, Agg backend): test recall against iteration per group, the training loss
terms read from the runs' TensorBoard event files, and a bar chart of the groups' final recalls beside the
published values."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from reporting.runs import RunRecord, headline_metric  # noqa: E402

LOSS_PREFIX = "loss/"  # runlog.Run.scalars writes every loss term as 'loss/<term>'
KS = (1, 10)  # the recalls that the plots show


def _mean_curve(curves: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """The mean over the curves at each step that at least one of them has."""
    steps = sorted({s for c in curves for s in c})
    return steps, [sum(c[s] for c in curves if s in c) / sum(1 for c in curves if s in c) for s in steps]


def _draw(ax, curves: dict[str, dict[int, float]], title: str, ylabel: str) -> None:
    """One thin line per seed and the mean in bold."""
    for label, curve in curves.items():
        steps = sorted(curve)
        ax.plot(steps, [curve[s] for s in steps], linewidth=0.8, alpha=0.6, label=label)
    if len(curves) > 1:
        steps, mean = _mean_curve(list(curves.values()))
        ax.plot(steps, mean, linewidth=2.5, color="black", label="mean")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def recall_curves(runs: list[RunRecord], k: int) -> dict[str, dict[int, float]]:
    """``{'seed <s>': {iteration: test recall@k in %}}`` from each run's metrics.json history."""
    out = {}
    for run in runs:
        curve = {}
        for entry in run.history:
            name = headline_metric(entry, "test", k)
            value = entry.get(name) if name else None
            if isinstance(entry.get("it"), int) and isinstance(value, (int, float)):
                curve[entry["it"]] = 100 * value
        if curve:
            out[f"seed {run.seed}"] = curve
    return out


def plot_recalls(runs: list[RunRecord], title: str, path: str) -> str | None:
    """Test recall@1 and @10 (%) against iteration: one thin line per seed, the mean in bold; None (no file)
    when no run has a test evaluation."""
    per_k = {k: recall_curves(runs, k) for k in KS}
    if not any(per_k.values()):
        return None
    fig, axes = plt.subplots(1, len(KS), figsize=(5 * len(KS), 3.8), dpi=100)
    for ax, k in zip(axes, KS):
        _draw(ax, per_k[k], f"{title}\ntest R@{k}", f"R@{k} (%)")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def loss_curves(run: RunRecord) -> dict[str, dict[int, float]]:
    """``{tag: {step: value}}`` of the run's scalars under LOSS_PREFIX, read with TensorBoard's own reader (all
    event files of the folder; a step written twice, by a resumed run, keeps its last value)."""
    acc = EventAccumulator(run.folder, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)}
            for tag in acc.Tags().get("scalars", []) if tag.startswith(LOSS_PREFIX)}


def plot_losses(runs: list[RunRecord], title: str, path: str) -> str | None:
    """One panel per loss term against iteration: a thin line per seed, the mean in bold; None (no file) when the
    runs hold no loss scalars."""
    per_tag: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        for tag, curve in loss_curves(run).items():
            if curve:
                per_tag.setdefault(tag, {})[f"seed {run.seed}"] = curve
    if not per_tag:
        return None
    tags = sorted(per_tag, key=lambda t: (t == f"{LOSS_PREFIX}total training loss", t))
    fig, axes = plt.subplots(len(tags), 1, figsize=(7, 2.6 * len(tags)), dpi=100, squeeze=False)
    for ax, tag in zip(axes[:, 0], tags):
        _draw(ax, per_tag[tag], f"{title}\n{tag}", tag[len(LOSS_PREFIX):])
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def plot_final_bars(bars: list[dict], path: str) -> str | None:
    """Bars of each group's final test R@1 and R@10 (mean %, sample sd as error bar) with the published value as a
    black mark. ``bars``: ``{"label", "k": {1: (mean, sd, published or None), 10: ...}}`` per group; None (no
    file) when no group has a value."""
    if not any(bar["k"].get(k) for bar in bars for k in KS):
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(bars) + 2), 4), dpi=100)
    width = 0.38
    for j, k in enumerate(KS):
        xs = [i + (j - 0.5) * width for i in range(len(bars))]
        cells = [bar["k"].get(k) or (float("nan"), None, None) for bar in bars]
        ax.bar(xs, [c[0] for c in cells], width, yerr=[c[1] or 0.0 for c in cells], capsize=4,
               label=f"final test R@{k}", color=("tab:blue", "tab:orange")[j])
        marks = [(x, c[2]) for x, c in zip(xs, cells) if c[2] is not None]
        if marks:
            ax.scatter([x for x, _ in marks], [v for _, v in marks], marker="_", s=900, linewidths=3,
                       color="black", zorder=3, label="published" if j == 0 else None)
    ax.set_xticks(range(len(bars)))
    ax.set_xticklabels([bar["label"] for bar in bars], fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def write_plots(groups: list[dict], out_dir: str) -> list[str]:
    """All plots of ``groups`` (each ``{"label", "runs", "bar"}``) into ``out_dir``; returns the files written."""
    written = []
    for i, group in enumerate(groups, 1):
        written.append(plot_recalls(group["runs"], group["label"], os.path.join(out_dir, f"recall_group{i}.png")))
        written.append(plot_losses(group["runs"], group["label"], os.path.join(out_dir, f"losses_group{i}.png")))
    written.append(plot_final_bars([g["bar"] for g in groups], os.path.join(out_dir, "final_recall.png")))
    return [p for p in written if p]
