"""Whether a group of runs measured what a published number measured: a verdict and the reasons against it.

A reason names one difference that changes the numbers: the query text, the split that picks the best checkpoint,
the Fashion IQ or CSS3D protocol, the image weights, the text encoder, the image size, far fewer iterations than
the papers' 160,000, listed images that were missing or unreadable, or images drawn by the synthetic generator in
a dataset's layout.
"""
from __future__ import annotations

import dataclasses
import os

from published import PROTOCOLS, PublishedRow, rows_for
from retrieval_datasets.synthetic import SYNTHETIC_MANIFEST
from reporting.runs import RunRecord

PAPER_ITERS = 160_000  # both papers' training length
MIN_ITERS = PAPER_ITERS // 2  # below this a run is "far short" of the papers'
PAPER_IMAGE_SIZE = 224


def text_encoder(args: dict) -> str:
    """'lstm', or the BERT model's name (--use_bert / --bert_model)."""
    return str(args.get("bert_model")) if args.get("use_bert") else "lstm"


def _query_text_protocol(run: RunRecord) -> str:
    complete = bool(run.args.get("use_complete_text_query")) or bool(run.metrics.get("query_text"))
    return "complete_text_query" if complete else "modification_text"


def _fashioniq_protocol(run: RunRecord) -> str:
    return str(run.args.get("fashioniq_protocol") or run.metrics.get("fashioniq_protocol") or "composeae")


def _css3d_protocol(run: RunRecord) -> str | None:
    path = run.args.get("dataset_path")
    if not path or not os.path.isdir(path):
        return None
    return "3d_to_3d" if os.path.isdir(os.path.join(path, "images")) else "2d_to_2d"


# How a run's protocol (a key of published.PROTOCOLS) is told, per --dataset; a dataset not listed has none.
PROTOCOL_OF = {"mitstates": _query_text_protocol, "fashion200k": _query_text_protocol,
               "fashionIQ": _fashioniq_protocol, "css3d": _css3d_protocol}
# Why a dataset's protocol may not be told from a run folder
UNTOLD = {"css3d": "whether the runs drew 2-D scenes or read the 3-D renders (their --dataset_path, with or "
                   "without images/, is not readable here)"}


def run_protocol(run: RunRecord) -> str | None:
    """The run's protocol as a key of ``published.PROTOCOLS``; None where it cannot be told here (CSS3D whose
    --dataset_path is not readable) or the dataset has no named protocols."""
    tell = PROTOCOL_OF.get(run.args.get("dataset"))
    return tell(run) if tell else None


def _values(runs: list[RunRecord], key: str) -> list:
    seen = []
    for run in runs:
        value = run.args.get(key)
        if value not in seen:
            seen.append(value)
    return seen


def _data_problems(run: RunRecord) -> list[str]:
    """The splits of metrics.json's ``"data": {split: {"listed", "present", "unreadable"}}`` with missing
    (listed - present) or unreadable listed images, each as ``'<split>: 120 listed images, 3 missing'``."""
    data = run.metrics.get("data")
    if not isinstance(data, dict):
        return []

    def count(c: dict, key: str) -> int:
        value = c.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    problems = []
    for split, c in data.items():
        if not isinstance(c, dict):
            continue
        listed = count(c, "listed")
        missing = listed - count(c, "present") if "present" in c else 0
        unreadable = count(c, "unreadable")
        found = ([f"{missing:,} missing"] if missing > 0 else []) + (
            [f"{unreadable:,} unreadable"] if unreadable > 0 else [])
        if found:
            problems.append(f"{split}: {listed:,} listed images, {' and '.join(found)}")
    return problems


def _synthetic(run: RunRecord) -> bool:
    """Whether the run's images were the synthetic generator's: metrics.json's ``synthetic_data`` (recorded at the
    start), else, for a run that did not record it, a ``synthetic_manifest.json`` in its --dataset_path as seen from
    the run's working folder (run.json's ``cwd``) now."""
    if "synthetic_data" in run.metrics:
        return bool(run.metrics["synthetic_data"])
    path = run.args.get("dataset_path")
    if not path:
        return False
    sessions = run.run_file.get("sessions") or [{}]
    cwd = sessions[0].get("cwd") if isinstance(sessions[0], dict) else None
    return os.path.isfile(os.path.join(cwd or "", str(path), SYNTHETIC_MANIFEST))


def general_reasons(runs: list[RunRecord]) -> list[str]:
    """The reasons that hold against every published number: selection on test, image weights, image size, too few
    iterations, missing or unreadable listed images (metrics.json "data", a reason per run naming its splits)."""
    reasons = []
    if "test" in _values(runs, "select_on"):
        reasons.append("best_checkpoint.pth is selected on the test split (--select_on test): its 'best' numbers "
                       "are picked on the data they report; use --select_on val")
    weights = [w for w in _values(runs, "image_weights") if w != "imagenet"]
    if weights:
        reasons.append(f"image weights {', '.join(map(str, weights))}, not ImageNet (--image_weights imagenet)")
    sizes = [s for s in _values(runs, "image_size") if s != PAPER_IMAGE_SIZE]
    if sizes:
        reasons.append(f"image size {', '.join(map(str, sizes))}, not {PAPER_IMAGE_SIZE} (--image_size)")
    iters = [run.args.get("num_iters") for run in runs]
    short = [n for n in iters if not isinstance(n, int) or n < MIN_ITERS]
    if short:
        reasons.append(f"{min((n for n in short if isinstance(n, int)), default='unknown')} iterations, far short "
                       f"of the papers' {PAPER_ITERS:,} (--num_iters)")
    generated = sorted({str(run.args.get("dataset_path")) for run in runs if _synthetic(run)})
    if generated:
        reasons.append(f"the images of {', '.join(generated)} are the synthetic generator's ({SYNTHETIC_MANIFEST}), "
                       f"not the dataset's release")
    for run in runs:
        problems = _data_problems(run)
        if problems:
            reasons.append(f"{run.folder}: {'; '.join(problems)} (recalls not comparable with published numbers)")
    return reasons


def row_reasons(runs: list[RunRecord], row: PublishedRow) -> list[str]:
    """What differs between the runs and ``row`` beyond ``general_reasons``: the protocol, the text encoder."""
    reasons = []
    protocols = {run_protocol(run) for run in runs}
    if protocols != {row.protocol}:
        if None in protocols:
            untold = UNTOLD.get(row.dataset, "the runs' protocol")
            reasons.append(f"cannot tell {untold}; the published number is {PROTOCOLS[row.protocol]}")
        else:
            mine = "; ".join(PROTOCOLS.get(p, str(p)) for p in sorted(protocols, key=str))
            reasons.append(f"protocol: the runs' {mine}; the published number's {PROTOCOLS[row.protocol]}")
    encoders = {text_encoder(run.args) for run in runs}
    if encoders != {row.text_encoder}:
        reasons.append(f"text encoder {', '.join(sorted(encoders))}, not the paper's {row.text_encoder}")
    return reasons


@dataclasses.dataclass
class Verdict:
    """``comparable``: every general reason absent and at least one published row of the group's dataset and
    model measured under the group's protocol and text encoder. ``published``: those rows, each with its own
    ``matches`` and ``why_not``."""

    comparable: bool
    why_not: list[str]
    published: list[dict]
    notes: list[str]


def judge(runs: list[RunRecord]) -> Verdict:
    """The verdict of a group of runs that differ only by seed."""
    dataset, model = runs[0].args.get("dataset"), runs[0].args.get("model")
    rows = rows_for(dataset, model)
    published = []
    for row in rows:
        reasons = row_reasons(runs, row)
        published.append({"source": row.source, **dataclasses.asdict(row), "matches": not reasons,
                          "why_not": reasons})
    why_not = general_reasons(runs)
    notes = []
    complete = any(run_protocol(run) == "complete_text_query" for run in runs)
    if not rows:
        why_not.append(f"no published number of --model {model} on --dataset {dataset}")
        if complete:
            why_not.append("the query text holds the target's label (--use_complete_text_query True)")
    elif not any(entry["matches"] for entry in published):
        for entry in published:
            why_not += [r for r in entry["why_not"] if r not in why_not]
    elif complete:
        notes.append("the query text holds the target's label (--use_complete_text_query True), as in ComposeAE's "
                     "published numbers; not comparable with numbers under TIRG's protocol")
    return Verdict(comparable=not why_not, why_not=why_not, published=published, notes=notes)
