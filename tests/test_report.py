"""report.py on hand-made run folders: grouping by run settings, mean and sample sd over seeds, the published rows
beside a group, the comparability verdict, the plots, and one-line errors."""
from __future__ import annotations

import json
import os
import statistics

import numpy as np
import pytest
from PIL import Image

import config
import report
from reporting.runs import RunRecord
from reporting.verdict import judge

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
R1, R10 = "test recall_top1_correct_composition", "test recall_top10_correct_composition"


def base_args(**changes) -> dict:
    """A resolved args dict as args.json holds it: every run setting, plus the observation flags report reads."""
    args = dict(model="tirg", use_bert=False, bert_model="bert-base-uncased", image_embed_dim=512, lstm_dim=16,
                image_size=64, use_complete_text_query=False, loss="soft_triplet", loss_weights=[1.0, 0.1, 0.1, 0.01],
                triplet_grad_scale=0.5, dataset="mitstates", category_to_train="all", exclude_source_adj=False,
                learning_rate=0.01, resnet_lr_scale=0.1, learning_rate_decay_frequency=9999999, weight_decay=1e-6,
                batch_size=32, seed=0, fuse_image_passes=False, amp=False, best_metric="auto", select_on="test",
                val_nouns=0, fashioniq_protocol="composeae", num_iters=300, image_weights="none",
                dataset_path="/nowhere", test_only=False, log_dir="logs", comment="")
    args.update(changes)
    return args


def write_run(folder, args: dict, evals: list[dict], best_it: int | None = None, losses: int = 6) -> str:
    """args.json, metrics.json (history = ``evals``, each with 'it') and a TensorBoard file of loss terms."""
    from torch.utils.tensorboard import SummaryWriter

    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "args.json"), "w") as f:
        json.dump({"args": args, "command": ["main.py"]}, f)
    metrics = {"dataset": args["dataset"], "select_on": args["select_on"], "latest": evals[-1], "history": evals}
    if best_it is not None:
        metrics["best"] = {"metric": R1, "value": 0.0, "it": best_it}
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    writer = SummaryWriter(folder)
    rng = np.random.default_rng(args["seed"])
    for step in range(1, losses + 1):
        writer.add_scalar("loss/soft_triplet", 4.0 / step + rng.random(), step)
        writer.add_scalar("loss/total training loss", 4.5 / step + rng.random(), step)
    writer.close()
    return folder


def mit_eval(it: int, r1: float, r10: float) -> dict:
    return {"it": it, R1: r1, "test recall_top1_correct_adj": r1 + 0.01, R10: r10,
            "train recall_top1_correct_composition": r1 / 2}


@pytest.fixture()
def four_runs(tmp_path):
    """Seeds 0, 1, 2 of one setting (evaluated at 150 and 300, best at 150), and seed 0 of another learning
    rate."""
    finals = {0: (0.10, 0.40), 1: (0.13, 0.44), 2: (0.17, 0.47)}
    for seed, (r1, r10) in finals.items():
        write_run(tmp_path / "runs" / f"a{seed}", base_args(seed=seed),
                  [mit_eval(150, r1 + 0.05, r10 - 0.1), mit_eval(300, r1, r10)], best_it=150)
    write_run(tmp_path / "runs" / "b0", base_args(learning_rate=0.02), [mit_eval(300, 0.2, 0.5)], best_it=300)
    return tmp_path, finals


def test_groups_statistics_published_verdict_and_plots(four_runs, capsys):
    tmp_path, finals = four_runs
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    assert len(data["groups"]) == 2
    (three,) = [g for g in data["groups"] if len(g["runs"]) == 3]
    (one,) = [g for g in data["groups"] if len(g["runs"]) == 1]
    assert sorted(three["seeds"]) == [0, 1, 2] and three["settings"]["learning_rate"] == 0.01
    assert one["settings"]["learning_rate"] == 0.02
    for name, k in ((R1, 0), (R10, 1)):
        values = [finals[s][k] for s in three["seeds"]]
        assert three["final"][name]["values"] == values
        assert three["final"][name]["mean"] == pytest.approx(statistics.mean(values))
        assert three["final"][name]["sd"] == pytest.approx(statistics.stdev(values))
        assert three["final"][name]["n"] == 3
    best_r1 = [finals[s][0] + 0.05 for s in three["seeds"]]  # the best checkpoint is the evaluation at 150
    assert three["best"][R1]["mean"] == pytest.approx(statistics.mean(best_r1))
    assert one["final"][R1] == {"mean": 0.2, "sd": None, "n": 1, "values": [0.2]}
    tirg = [p for p in three["published"] if p["metric"] == R1]
    assert {"source", "dataset", "protocol", "model", "metric", "value"} <= set(tirg[0])
    assert tirg[0]["source"].endswith("CVPR 2019, arXiv 1812.07119, Table 2")
    assert len(tirg) == 1 and tirg[0]["arxiv"] == "1812.07119" and tirg[0]["model"] == "tirg"
    assert tirg[0]["value"] == pytest.approx(0.122) and tirg[0]["dataset"] == "mitstates"
    assert three["comparable"] is False
    assert any("image weights none" in r for r in three["why_not"])
    assert any("300 iterations" in r for r in three["why_not"])
    assert any("select_on test" in r for r in three["why_not"])
    md = (out / "report.md").read_text()
    assert md == printed and "12.2" in md and f"{100 * statistics.mean(best_r1):.2f} ±" in md
    for name in ("recall_group1.png", "losses_group1.png", "recall_group2.png", "losses_group2.png",
                 "final_recall.png"):
        raw = (out / name).read_bytes()
        assert raw[:8] == PNG_MAGIC and len(raw) > 8000, name
        pixels = np.asarray(Image.open(out / name).convert("RGB"), dtype=np.float64)
        assert pixels.var() > 100, name  # drawn on, not one colour


def test_out_defaults_to_the_first_folder_and_a_corrupt_run_is_skipped(four_runs, capsys):
    tmp_path, _ = four_runs
    (tmp_path / "runs" / "a2" / "metrics.json").write_text("{not json")
    assert report.main([str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "report.py: warning: skipped" in err and os.path.join("runs", "a2") in err
    data = json.loads((tmp_path / "runs" / "report.json").read_text())
    assert sorted(len(g["runs"]) for g in data["groups"]) == [1, 2]


def test_same_seed_twice_keeps_the_later_run(tmp_path, capsys):
    write_run(tmp_path / "old", base_args(), [mit_eval(100, 0.1, 0.3)])
    write_run(tmp_path / "new", base_args(), [mit_eval(100, 0.1, 0.3), mit_eval(300, 0.2, 0.4)])
    assert report.main([str(tmp_path)]) == 0
    assert "two runs of seed 0" in capsys.readouterr().err
    (group,) = json.loads((tmp_path / "report.json").read_text())["groups"]
    assert group["runs"] == [str(tmp_path / "new")] and group["final"][R1]["values"] == [0.2]


@pytest.mark.parametrize("case", ["empty", "missing", "only_corrupt"])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, case):
    folder = tmp_path / "f"
    if case != "missing":
        folder.mkdir()
    if case == "only_corrupt":
        write_run(folder / "r", base_args(), [mit_eval(1, 0.1, 0.2)])
        (folder / "r" / "metrics.json").write_text('{"latest": 3}')
    assert report.main([str(folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("report.py: error: ") and str(folder) in err[0]


def paper_like(**changes) -> dict:
    return base_args(**{**dict(image_weights="imagenet", image_size=224, num_iters=160000, select_on="val"),
                        **changes})


def test_verdict_names_each_difference_from_the_published_protocol():
    def verdict(**changes):
        return judge([RunRecord("r", paper_like(**changes), {"latest": {}, "history": []})])

    assert verdict().comparable and verdict().why_not == []
    bert = verdict(use_bert=True)
    assert not bert.comparable and any("text encoder bert-base-uncased" in r for r in bert.why_not)
    complete = verdict(use_complete_text_query=True)
    assert not complete.comparable and any("protocol" in r and "target's label" in r for r in complete.why_not)
    ae = verdict(model="composeAE", use_bert=True, use_complete_text_query=True)
    assert ae.comparable and ae.notes and {p["arxiv"] for p in ae.published} == {"2006.11149"}
    ae_modification = verdict(model="composeAE", use_bert=True)
    assert not ae_modification.comparable and any("protocol" in r for r in ae_modification.why_not)
    def with_data(data):
        return judge([RunRecord("r", paper_like(), {"latest": {}, "history": [], "data": data})])

    missing = with_data({"train": {"listed": 1200, "present": 1197, "unreadable": 0},
                         "test": {"listed": 50, "present": 50, "unreadable": 0}})
    assert not missing.comparable
    assert [r for r in missing.why_not if r.startswith("r: ")] == [
        "r: train: 1,200 listed images, 3 missing (recalls not comparable with published numbers)"]
    unreadable = with_data({"dress test": {"listed": 9, "present": 8, "unreadable": 2}})
    assert any("r: dress test: 9 listed images, 1 missing and 2 unreadable" in r for r in unreadable.why_not)
    assert with_data({"train": {"listed": 5, "present": 5, "unreadable": 0}}).comparable
    fiq = verdict(dataset="fashionIQ", model="composeAE", use_bert=True, fashioniq_protocol="standard")
    assert not fiq.comparable and any("per-category" in r for r in fiq.why_not)
    small = verdict(image_size=64, num_iters=1000)
    assert any(r.startswith("image size 64") for r in small.why_not)
    assert any(r.startswith("1000 iterations") for r in small.why_not)


def test_fashioniq_mean_over_categories_beside_composeae_row(tmp_path):
    evals = [{"it": 10, "test recall_top10_correct_dress": 0.1, "test recall_top10_correct_shirt": 0.2,
              "test recall_top10_correct_toptee": 0.6}]
    write_run(tmp_path / "r", paper_like(dataset="fashionIQ", model="composeAE", use_bert=True), evals)
    assert report.main([str(tmp_path)]) == 0
    (group,) = json.loads((tmp_path / "report.json").read_text())["groups"]
    assert group["final"]["test recall_top10_correct_mean"]["mean"] == pytest.approx(0.3)
    assert [p["value"] for p in group["published"] if p["metric"] == "test recall_top10_correct_mean"] == [0.118]


def test_group_keys_mirror_the_run_settings():
    import main

    assert "seed" not in report.GROUP_KEYS and set(report.GROUP_KEYS) | {"seed"} == set(config.RUN_SETTINGS)


def test_css3d_protocol_is_told_from_the_dataset_folder(tmp_path):
    def verdict(path):
        return judge([RunRecord("r", paper_like(dataset="css3d", dataset_path=str(path), resnet_lr_scale=1.0),
                                {"latest": {}, "history": []})])

    (tmp_path / "images").mkdir()
    rendered = verdict(tmp_path)
    assert rendered.comparable
    assert {p["protocol"]: p["matches"] for p in rendered.published} == {"3d_to_3d": True, "2d_to_3d": False}
    drawn = verdict(tmp_path / "images")  # a folder without images/: the scenes drawn in 2-D
    assert not drawn.comparable and all("2-D drawn query and gallery" in r for r in drawn.why_not)
    unknown = verdict(tmp_path / "elsewhere")
    assert not unknown.comparable and any(r.startswith("cannot tell whether the runs drew") for r in unknown.why_not)


def test_the_report_names_the_code_libraries_and_devices_of_each_group(four_runs, capsys):
    tmp_path, _ = four_runs
    sessions = {"a0": ("1" * 40, False), "a1": ("2" * 40, True)}  # a2 has no run.json
    for name, (commit, dirty) in sessions.items():
        with open(tmp_path / "runs" / name / "run.json", "w") as f:
            json.dump({"format": "composeae-run/1", "sessions": [
                {"git": {"commit": commit, "dirty": dirty}, "versions": {"torch": "9.9", "numpy": "1.0"},
                 "device_name": "cpu-x", "status": "finished"}]}, f)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    capsys.readouterr()
    (three,) = [g for g in json.loads((out / "report.json").read_text())["groups"] if len(g["runs"]) == 3]
    prov = three["provenance"]
    assert prov["git_commits"] == ["1" * 40, "2" * 40 + "+changes"]
    assert prov["versions"] == [{"numpy": "1.0", "torch": "9.9"}] and prov["devices"] == ["cpu-x"]
    assert prov["runs_without_run_json"] == [str(tmp_path / "runs" / "a2")]
    md = (out / "report.md").read_text()
    assert "(the runs ran different code) (uncommitted changes)" in md and "numpy 1.0, torch 9.9" in md
    assert f"Provenance unknown (no run.json, or sessions before it): {tmp_path / 'runs' / 'a2'}" in md


def test_synthetic_images_are_a_reason_recorded_at_the_start_or_seen_from_the_runs_folder(tmp_path):
    from reporting.runs import read_run
    from reporting.verdict import general_reasons

    data = tmp_path / "synth"
    data.mkdir()
    (data / "synthetic_manifest.json").write_text("{}")
    recorded = write_run(tmp_path / "a", base_args(dataset_path="/gone"), [mit_eval(300, 0.1, 0.4)])
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    (tmp_path / "a" / "metrics.json").write_text(json.dumps({**metrics, "synthetic_data": True}))
    relative = write_run(tmp_path / "b", base_args(dataset_path="synth"), [mit_eval(300, 0.1, 0.4)])
    (tmp_path / "b" / "run.json").write_text(json.dumps({"sessions": [{"cwd": str(tmp_path)}]}))
    real = write_run(tmp_path / "c", base_args(dataset_path=str(data)), [mit_eval(300, 0.1, 0.4)])
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    (tmp_path / "c" / "metrics.json").write_text(json.dumps({**metrics, "synthetic_data": False}))
    for folder, expected in ((recorded, True), (relative, True), (real, False)):
        reasons = general_reasons([read_run(folder)])
        assert any("synthetic generator" in r for r in reasons) == expected, folder
