"""``--report DIR``: the markdown summary of the benchmark JSONs and recall runs that ``tools/gpu_bench.sh`` left
in a folder, against the issue's reference and targets."""
from __future__ import annotations

import glob
import json
import math
import os

from benchmarks.common import REFERENCE, RESNET18_CEILING_IMAGES_PER_S, TARGETS

BENCH_ROWS = [  # file stem, label, reference key, target
    ("bench_a", "(a) ComposeAE+BERT-base b32, fp32, no cache (baseline of this code)",
     "composeAE_bert_b32_samples_per_s", None),
    ("bench_b", "(b) ComposeAE+BERT-base b32, fast", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_g", "(g) = (b) + --cuda_graph", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_h", "(h) = (g) + --fuse_image_passes", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_c", "(c) ComposeAE+BERT-base large batch, fast", None,
     (">= 70% of ceiling", lambda r: (r.get("fraction_of_ceiling") or 0) >= TARGETS["best_batch_fraction_of_ceiling"])),
    ("bench_d", "(d) TIRG+LSTM b32, fast", "tirg_lstm_b32_samples_per_s", None),
    ("bench_b_cudnn", "(b2) = (b) + cudnn.benchmark", "composeAE_bert_b32_samples_per_s",
     ("samples/s >= 1700", lambda r: r["train_samples_per_s"] >= TARGETS["composeAE_bert_b32_samples_per_s"])),
    ("bench_f", "(f) = (b) + compile", "composeAE_bert_b32_samples_per_s", None),
]
OPTIONAL_ROWS = ("bench_b_cudnn", "bench_f")
RECALL_TAGS = ("recall_plain_s0", "recall_fast_s0", "recall_plain_s1")
RECALL_METRICS = ("recall_top1_correct_composition", "recall_top5_correct_composition",
                  "recall_top10_correct_composition", "recall_top1_correct_adj", "recall_top1_correct_noun")


def _load(path: str) -> dict | None:
    """The JSON object in ``path``; None when it is missing or not JSON."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _fmt(x, digits: int = 0) -> str:
    """``x`` with thousands separators and ``digits`` decimals; a dash for None."""
    if x is None:
        return "—"
    return f"{x:,.{digits}f}"


def _step_status(out_dir: str) -> dict[str, str]:
    """``{step: 'status (seconds s)'}`` from gpu_bench.sh's steps.tsv (empty without one)."""
    status = {}
    try:
        with open(os.path.join(out_dir, "steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    status[parts[0]] = f"{parts[1]} ({parts[2]} s)"
    except OSError:
        pass
    return status


def _recall_metrics(out_dir: str, tag: str) -> dict | None:
    """The latest metrics of the newest recall run ``runs/*<tag>/metrics.json``; None without one."""
    files = sorted(glob.glob(os.path.join(out_dir, "runs", f"*{tag}", "metrics.json")))
    data = _load(files[-1]) if files else None
    return data.get("latest") if data else None


def _bench_row(label: str, r: dict, ref_key: str | None, target, st: str) -> str:
    """The table row of one benchmark JSON ``r``."""
    s = r["settings"]
    errors = [f"{k}: {v[:80]}" for k, v in r.items() if k.endswith("_error")]
    st = "; ".join([st] + errors)
    ref = REFERENCE.get(ref_key) if ref_key else None
    met = "—" if not target else f"{target[0]}: {'yes' if target[1](r) else 'NO'}"
    frac = r.get("fraction_of_ceiling")
    return (
        f"| {label} [b{s['batch_size']}, amp={s['amp']}, cl={s['channels_last']}, cache={'on' if s['image_cache'] else 'off'}, "
        f"w={s['workers']}, compile={s['compile']}, graph={s.get('cuda_graph', False)}, "
        f"fuse={s.get('fuse_image_passes', False)}] | {_fmt(r['train_samples_per_s'])} | {_fmt(r['train_step_ms'], 1)} | "
        f"{_fmt(100 * frac, 0) + '%' if frac else '—'} | {_fmt(r.get('eval_queries_per_s'))} | "
        f"{_fmt(r['peak_memory_gib'], 2)} | {_fmt(ref)} | {_fmt(r['train_samples_per_s'] / ref, 1) + 'x' if ref else '—'} | "
        f"{met} | {_fmt(r.get('host_syncs_per_step'), 1)} | {_fmt(100 * r.get('data_wait_fraction', 0), 0)}% | {st} |")


def _bench_table(out_dir: str, status: dict[str, str]) -> tuple[list[str], dict[str, dict | None]]:
    """The table of the ``BENCH_ROWS`` (an optional row only when it ran) and the JSONs read, by file stem."""
    lines = ["| config | train samples/s | step ms | % of ceiling | eval queries/s | peak mem GiB | reference | "
             "x reference | target | host syncs/step | data wait | step status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    for stem, label, ref_key, target in BENCH_ROWS:
        r = _load(os.path.join(out_dir, stem + ".json"))
        results[stem] = r
        st = status.get(stem, "not run")
        if r is None or "train_samples_per_s" not in r:
            if stem in OPTIONAL_ROWS and stem not in status:
                continue
            lines.append(f"| {label} | — | — | — | — | — | {_fmt(REFERENCE.get(ref_key)) if ref_key else '—'} | — | "
                         f"{target[0] if target else '—'} | — | — | {st} |")
            continue
        lines.append(_bench_row(label, r, ref_key, target, st))
    return lines, results


def _eval_row(results: dict[str, dict | None]) -> list[str]:
    """Row (e): the best evaluation queries/s of the runs, against the reference and the target."""
    evals = [(r["eval_queries_per_s"], stem) for stem, r in results.items() if r and r.get("eval_queries_per_s")]
    if not evals:
        return []
    best, stem = max(evals)
    base = results.get("bench_a") or {}
    return [f"| (e) evaluation, best of the runs above ({stem}, eval batch "
            f"{results[stem]['settings']['eval_batch_size']}; baseline (a): "
            f"{_fmt(base.get('eval_queries_per_s'))} q/s) | — | — | — | {_fmt(best)} | — | "
            f"{_fmt(REFERENCE['eval_queries_per_s'])} | {_fmt(best / REFERENCE['eval_queries_per_s'], 1)}x | "
            f">= 10,000: {'yes' if best >= TARGETS['eval_queries_per_s'] else 'NO'} | — | — | — |"]


def _setup_note(any_r: dict | None) -> list[str]:
    """The device, data and reference figures, from any one benchmark JSON."""
    if not any_r:
        return []
    s, d = any_r["settings"], any_r["data"]
    return ["", f"Device: {s['device_name']}, torch {s['torch_version']} (CUDA {s['cuda_version']}), "
                f"{s['cpu_count']} CPUs. Data: {d['train_images']} training + {d['test_images']} test images "
                f"({d['jpeg_size']} px JPEGs, resized to {s['image_size']}), {d['test_queries']} test queries. "
                f"Reference (original code, H100): ComposeAE+BERT 169, TIRG+LSTM 234 samples/s, eval 329 q/s. "
                f"Ceiling (ResNet-18 step, bf16+channels_last): 2 images per sample -> "
                f"{RESNET18_CEILING_IMAGES_PER_S[32] / 2:,.0f} samples/s at b32, "
                f"{RESNET18_CEILING_IMAGES_PER_S[256] / 2:,.0f} at b256."]


def _graph_checks(results: dict[str, dict | None]) -> list[str]:
    """One paragraph per run with a CUDA graph check (or its failure)."""
    lines = []
    for stem, r in results.items():
        check = (r or {}).get("graph_check")
        if check:
            lines += ["", f"Graph check ({stem}: {check['steps']} batches eager and through the CUDA graph from the same "
                          f"weights, dropout off): loss max abs diff {check['loss_max_abs_diff']:.3g}, weights max rel "
                          f"diff {check['weights_max_rel_diff']:.3g} ({check['worst_tensor']}), integer buffers equal: "
                          f"{check['int_buffers_equal']}, captures: {check['captures']}; eager against eager: loss "
                          f"{check.get('eager_noise_loss_max_abs_diff', float('nan')):.3g}, weights "
                          f"{check.get('eager_noise_weights_max_rel_diff', float('nan')):.3g}."]
        elif r and r.get("graph_check_error"):
            lines += ["", f"Graph check ({stem}) failed: {r['graph_check_error'][:200]}"]
    return lines


def _ceiling_note(out_dir: str) -> list[str]:
    """The ceiling measured by ``--ceiling`` (ceiling.json), against the issue's."""
    ceiling = _load(os.path.join(out_dir, "ceiling.json"))
    if not (ceiling and ceiling.get("ceiling_images_per_s")):
        return []
    c = ceiling["ceiling_images_per_s"]
    return ["", "Ceiling measured on this machine (bare ResNet-18 step, bf16 + channels_last): " + ", ".join(
        f"b{bs}: {_fmt(v)} images/s (issue: {_fmt(RESNET18_CEILING_IMAGES_PER_S.get(int(bs)))})"
        for bs, v in c.items()) + "."]


def _recall_table(recall: dict[str, dict | None], status: dict[str, str], any_r: dict | None) -> list[str]:
    """The test recalls of the short training runs: fast against plain fp32, and the seed noise beside it."""
    lines = ["", "| test metric (after the short training run) | plain fp32 seed 0 | fast seed 0 | plain fp32 seed 1 | "
                 "fast - plain (seed 0) | seed noise (plain s1 - s0) | binomial s.e. |",
             "|---|---|---|---|---|---|---|"]
    q = (any_r or {}).get("data", {}).get("test_queries")
    for name in RECALL_METRICS:
        vals = [(recall[t] or {}).get(f"test {name}") for t in RECALL_TAGS]
        diff = vals[1] - vals[0] if None not in vals[:2] else None
        noise = vals[2] - vals[0] if vals[0] is not None and vals[2] is not None else None
        se = math.sqrt(vals[0] * (1 - vals[0]) / q) if (vals[0] is not None and q) else None
        lines.append(f"| {name} | {_fmt(vals[0], 4)} | {_fmt(vals[1], 4)} | {_fmt(vals[2], 4)} | "
                     f"{_fmt(diff, 4)} | {_fmt(noise, 4)} | {_fmt(se, 4)} |")
    for tag in RECALL_TAGS:
        lines.append(f"\n{tag}: {status.get(tag, 'not run')}")
    return lines


def summarize(out_dir: str) -> str:
    """Markdown tables of the benchmark JSONs and the recall runs that tools/gpu_bench.sh left in ``out_dir``."""
    status = _step_status(out_dir)
    lines, results = _bench_table(out_dir, status)
    lines += _eval_row(results)
    any_r = next((r for r in results.values() if r), None)
    lines += _setup_note(any_r)
    lines += _graph_checks(results)
    lines += _ceiling_note(out_dir)
    recall = {tag: _recall_metrics(out_dir, tag) for tag in RECALL_TAGS}
    if any(recall.values()):
        lines += _recall_table(recall, status, any_r)
    shown = ("bench_", "recall_") if any(recall.values()) else ("bench_",)
    others = [f"{k}: {v}" for k, v in status.items() if not k.startswith(shown)]
    if others:
        lines += ["", "Other steps: " + "; ".join(others)]
    return "\n".join(lines)
