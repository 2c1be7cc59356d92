"""A results report over run folders: the runs grouped by their settings, mean and sample sd over the seeds, the
published numbers beside them with a verdict on whether they are comparable, and plots.

    python report.py logs/mitstates-tirg-1a2b3c4d            # a sweep's folder (sweep.py), or any run folders
    python report.py RUN_A RUN_B --out results/

Writes report.md (also printed), report.json and PNG plots into --out (default: the first folder).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from errors import OneLineParser, UserInputError, report_internal_error
import config
from reporting import plots
from reporting.runs import (RunRecord, group_provenance, group_runs, headline_metric, load_runs, split_metric,
                            summarize)
from reporting.verdict import judge, text_encoder

PROG = "report.py"
# The args.json keys whose values split runs into groups: the settings that define a run (the ones a checkpoint
# carries) except the seed, so that a group's runs differ only by seed.
GROUP_KEYS = tuple(name for name in config.RUN_SETTINGS if name != "seed")
LABEL_KEYS = 3  # settings that tell groups apart, shown in a group's label


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="run folders, or folders above them (a sweep's); every metrics.json below is read")
    p.add_argument("--out", type=str, default="", help="folder for report.md, report.json and the plots "
                                                       "('' = the first FOLDER)")
    return p


def _label(i: int, group: list[RunRecord], differing: list[str]) -> str:
    args = group[0].args
    extra = ", ".join(f"{k} {args.get(k)}" for k in differing[:LABEL_KEYS])
    return f"G{i} {args.get('dataset')} {args.get('model')} {text_encoder(args)}" + (f" ({extra})" if extra else "")


def _bar(final: dict, published: list[dict]) -> dict:
    """The bar chart's cells of a group: final test R@1 / R@10 in % (mean, sd, the published value or None)."""
    cells = {}
    for k in plots.KS:
        name = headline_metric(final, "test", k)
        if name is None:
            continue
        stat = final[name]
        pub = [p["value"] for p in published if p["metric"] == name]
        cells[k] = (100 * stat["mean"], 100 * stat["sd"] if stat["sd"] is not None else None,
                    100 * pub[0] if pub else None)
    return cells


def build_groups(runs: list[RunRecord], warn) -> list[dict]:
    """The report's groups: settings, runs, seeds, the final and the best-checkpoint statistics, the published rows
    beside them and the verdict; each also carries its RunRecords (``_runs``) and plot label."""
    grouped = group_runs(runs, GROUP_KEYS, warn)
    differing = [k for k in GROUP_KEYS if k not in ("dataset", "model", "use_bert", "bert_model")
                 and len({json.dumps(g[0].args.get(k), sort_keys=True) for g in grouped}) > 1]
    out = []
    for i, group in enumerate(grouped, 1):
        verdict = judge(group)
        final = summarize([r.latest for r in group])
        out.append({
            "label": _label(i, group, differing),
            "settings": {k: group[0].args.get(k) for k in GROUP_KEYS},
            "runs": [r.folder for r in group],
            "seeds": [r.seed for r in group],
            "iterations": [r.latest_it for r in group],
            "final": final,
            "best": summarize([r.best_entry() for r in group]),
            "published": verdict.published,
            "comparable": verdict.comparable,
            "why_not": verdict.why_not,
            "notes": verdict.notes,
            "provenance": group_provenance(group),
            "_runs": group,
            "_bar": _bar(final, verdict.published),
            "_short": f"G{i}\n{group[0].args.get('dataset')}\n{group[0].args.get('model')}",
        })
    return out


def _pct(stat: dict | None) -> str:
    if not stat:
        return "–"
    sd = f" ± {100 * stat['sd']:.2f}" if stat["sd"] is not None else ""
    return f"{100 * stat['mean']:.2f}{sd} (n={stat['n']})"


def _published_cell(rows: list[dict]) -> str:
    cells = []
    for row in rows:
        table = f", Table {row['table']}" if row["table"] else ""
        flags = ("" if row["checked"] else "unchecked; ") + ("protocol matches" if row["matches"] else "differs")
        cells.append(f"{100 * row['value']:.1f} ({row['model']}, arXiv {row['arxiv']}{table}, "
                     f"{row['protocol']}; {flags})")
    return "<br>".join(cells) or "–"


def table_metrics(group: dict) -> list[str]:
    """The metrics report.md shows: the test split's headline view (composition, or the Fashion IQ mean) at every
    k, then any other metric a published row names."""
    names = list(group["final"]) + [n for n in group["best"] if n not in group["final"]]
    views = {"composition"} if any((split_metric(n) or ("", 0, ""))[2] == "composition" for n in names) else {"mean"}
    shown = [n for n in names if (split_metric(n) or ("", 0, ""))[0] == "test" and split_metric(n)[2] in views]
    shown.sort(key=lambda n: split_metric(n)[1])
    return shown + [p["metric"] for p in group["published"] if p["metric"] not in shown]


def group_markdown(group: dict) -> list[str]:
    """A group's section of report.md."""
    n = len(group["runs"])
    lines = [f"## {group['label']}", "",
             f"Seeds {', '.join(map(str, group['seeds']))} ({n} run{'s' * (n != 1)}); last evaluated iterations "
             f"{', '.join(map(str, group['iterations']))}.", "",
             "Settings: " + ", ".join(f"`{k}={v}`" for k, v in group["settings"].items()), "",
             f"**Comparable with the published numbers: {'yes' if group['comparable'] else 'no'}**"]
    lines += [f"- {reason}" for reason in group["why_not"]]
    lines += [f"- note: {note}" for note in group["notes"]]
    lines += ["", "| metric | final (% mean ± sd) | best checkpoint (% mean ± sd) | published (%) |",
              "|---|---|---|---|"]
    for name in table_metrics(group):
        rows = [p for p in group["published"] if p["metric"] == name]
        lines.append(f"| {name} | {_pct(group['final'].get(name))} | {_pct(group['best'].get(name))} | "
                     f"{_published_cell(rows)} |")
    for row in group["published"]:
        if row["why_not"]:
            lines.append(f"- {row['model']} {row['metric']} (arXiv {row['arxiv']}) differs: "
                         + "; ".join(row["why_not"]))
    lines += ["", "Runs: " + ", ".join(f"`{r}`" for r in group["runs"]), *_provenance_lines(group["provenance"]), ""]
    return lines


def _provenance_lines(prov: dict) -> list[str]:
    """report.md's lines on what produced a group: its code's commits, libraries and devices (run.json)."""
    versions = "; ".join(", ".join(f"{k} {v}" for k, v in sorted(vs.items()) if v) for vs in prov["versions"] if vs)
    lines = ["", f"Code: {', '.join(f'`{c}`' for c in prov['git_commits']) or 'unknown'}"
             + (" (the runs ran different code)" if len(prov["git_commits"]) > 1 else "")
             + (" (uncommitted changes)" if any(c.endswith("+changes") for c in prov["git_commits"]) else ""),
             f"Libraries: {versions or 'unknown'}; devices: {', '.join(map(str, prov['devices'])) or 'unknown'}"]
    if prov["runs_without_run_json"]:
        lines.append(f"Provenance unknown (no run.json, or sessions before it): "
                     f"{', '.join(prov['runs_without_run_json'])}")
    return lines


def markdown(groups: list[dict], folders: list[str], pictures: list[str], out_dir: str) -> str:
    """The whole report.md."""
    n_runs = sum(len(g["runs"]) for g in groups)
    lines = ["# Results report", "",
             f"{n_runs} run{'s' * (n_runs != 1)} in {len(groups)} group{'s' * (len(groups) != 1)} (runs that "
             f"differ only by seed), read from {', '.join(f'`{f}`' for f in folders)}. 'final' is each run's last "
             f"evaluation, 'best checkpoint' the evaluation of its best_checkpoint.pth; sd is the sample standard "
             f"deviation over the seeds.", ""]
    for group in groups:
        lines += group_markdown(group)
    if pictures:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out_dir)})" for p in pictures]
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def out_folder(args: argparse.Namespace) -> str:
    """--out (default: the first folder), created if missing; UserInputError when it cannot be."""
    out = args.out or args.folders[0]
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise UserInputError(f"--out {out}: cannot create it ({exc.strerror or exc}); pass a writable folder") from None
    if not os.access(out, os.W_OK):
        raise UserInputError(f"--out {out}: not writable; pass a writable folder")
    return out


def run_report(args: argparse.Namespace) -> int:
    """Reads the runs, writes report.json, the plots and report.md into the output folder, prints report.md."""
    def warn(line: str) -> None:
        print(f"{PROG}: warning: {line}", file=sys.stderr)

    runs = load_runs(args.folders, warn)
    out = out_folder(args)
    groups = build_groups(runs, warn)
    pictures = plots.write_plots([{"label": g["label"], "runs": g["_runs"], "bar": {"label": g["_short"],
                                                                                  "k": g["_bar"]}}
                                  for g in groups], out)
    public = [{k: v for k, v in g.items() if not k.startswith("_")} for g in groups]
    _write(os.path.join(out, "report.json"), json.dumps({"groups": public}, indent=2, allow_nan=False) + "\n")
    text = markdown(groups, args.folders, pictures, out)
    _write(os.path.join(out, "report.md"), text)
    print(text, end="")
    print(f"{PROG}: wrote report.md, report.json and {len(pictures)} plot{'s' * (len(pictures) != 1)} to {out}",
          file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = get_args_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return run_report(args)
    except UserInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 (the entry point's last resort: one line, traceback in a file)
        return report_internal_error(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())
