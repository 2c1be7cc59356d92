"""The fast settings change speed, not results: image cache, bf16 autocast, channels_last; and benchmark.py runs.

Every check goes through the code paths that main.py and benchmark.py use (build_datasets, EpochBatchSampler,
collate_train in a DataLoader, factory.create_model_and_optimizer, sgd_step.train_one_step). No timings are asserted.
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import pytest
import torch

import benchmark
import config
import datasets
import image_cache
import synthetic as synthetic_data
import factory
import sgd_step
from cuda_graph import CudaGraphStep

S = 32  # image side


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("fast") / "synthetic")
    synthetic_data.generate_synthetic(path, seed=0, image_size=40, n_train_nouns=2, n_test_nouns=1,
                                adjectives_per_noun=3, images_per_class=4)
    return path


def make_args(path: str, *extra: str) -> argparse.Namespace:
    argv = ["--dataset", "mitstates", "--dataset_path", path, "--image_size", str(S), "--image_weights", "none",
            "--batch_size", "8", "--loss", "batch_based_classification", "--loader_num_workers", "0",
            "--device", "cpu", *extra]
    return config.resolve_defaults(config.get_args_parser().parse_args(argv))


def loader_batches(trainset, args, n: int, workers: int) -> list[dict]:
    """The first ``n`` training batches through the loader training.train builds (epochs 0, 1, ...)."""
    sampler = datasets.EpochBatchSampler(trainset, args.batch_size, args.seed)
    loader = torch.utils.data.DataLoader(trainset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=datasets.collate_train,
                                         generator=torch.Generator().manual_seed(args.seed))
    return [b for _, b in zip(range(n), benchmark.endless_batches(loader, sampler))]


# ----------------------------------------------------------------------------------------------------------------
def test_cached_training_batches_equal_uncached(synthetic, tmp_path):
    """End to end (datasets.py's own tests compare single images): batches built from the memmap cache by loader
    worker processes equal batches decoded from the JPEGs, over an epoch boundary."""
    cache = str(tmp_path / "cache")
    args = make_args(synthetic)
    plain, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    cached, cached_test = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0, image_cache=cache)
    assert len(os.listdir(cache)) == 4  # train and test: data + sidecar each
    n = len(datasets.EpochBatchSampler(plain, args.batch_size, 0)) + 1  # crosses into epoch 1
    fresh = loader_batches(plain, args, n, workers=0)
    from_cache = loader_batches(cached, args, n, workers=2)
    assert len(fresh) == len(from_cache) == n
    for a, b in zip(fresh, from_cache):
        assert a["source_img"].dtype == b["source_img"].dtype == torch.uint8
        assert a["source_img"].shape == (args.batch_size, 3, S, S)
        assert torch.equal(a["source_img"], b["source_img"]) and torch.equal(a["target_img"], b["target_img"])
        assert a["text"] == b["text"] and torch.equal(a["target_img_id"], b["target_img_id"])
    # a cache of a different image size is a different cache, never a resized copy of this one
    other, _ = datasets.build_datasets("mitstates", synthetic, image_size=S // 2, seed=0, image_cache=cache)
    assert other[(0, 0, 0)]["source_img"].shape == (3, S // 2, S // 2) and len(os.listdir(cache)) == 8
    assert torch.equal(cached_test.load_image(3), image_cache.load_rgb_uint8(cached_test.imgs[3]["file_path"], S))


# ----------------------------------------------------------------------------------------------------------------
def _step(args, model, optimizer, scheduler, batch):
    torch.manual_seed(123)  # the same dropout masks in both runs
    terms = sgd_step.train_one_step(model, batch, optimizer, scheduler, args, torch.device("cpu"))
    grad = model.img_model.fc[0].weight.grad.detach().clone()
    return {k: float(v) for k, v in terms.items()}, grad


def _twin_models(args, trainset):
    torch.manual_seed(0)
    model, optimizer, scheduler = factory.create_model_and_optimizer(args, trainset.get_all_texts())
    twin = copy.deepcopy(model)  # the same weights (and, for BERT, the same frozen encoder)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=args.learning_rate, momentum=0.9)  # compared: loss, grads
    twin_sched = torch.optim.lr_scheduler.LambdaLR(twin_opt, lambda it: 1.0)
    return (model, optimizer, scheduler), (twin, twin_opt, twin_sched)


def test_amp_training_step_loss_close_to_fp32(synthetic, tiny_bert_32):
    """bf16 autocast (CPU) on the same weights and batch of ComposeAE + BERT: every loss term stays within 2% of
    fp32, the image encoder really ran in bf16, and the gradient of the image embedding layer points the same way
    (cosine > 0.9; bf16 at random initialisation gives ~0.95 here, a broken cast gives ~0)."""
    extra = ["--model", "composeAE", "--use_bert", "True", "--bert_model", tiny_bert_32, "--batch_size", "16"]
    fp32_args, amp_args = make_args(synthetic, *extra), make_args(synthetic, *extra, "--amp", "True")
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    batch = loader_batches(trainset, fp32_args, 1, workers=0)[0]
    (m32, o32, s32), (m16, o16, s16) = _twin_models(fp32_args, trainset)
    dtypes = []
    m16.img_model.conv1.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    loss32, grad32 = _step(fp32_args, m32, o32, s32, batch)
    loss16, grad16 = _step(amp_args, m16, o16, s16, batch)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)  # autocast reached the ResNet
    assert loss32.keys() == loss16.keys()
    for name in loss32:
        assert loss16[name] == pytest.approx(loss32[name], rel=2e-2, abs=1e-3), name
    assert loss16["total training loss"] != loss32["total training loss"]  # bf16 really changed the arithmetic
    cos = torch.nn.functional.cosine_similarity(grad32.flatten(), grad16.flatten(), dim=0)
    assert cos > 0.9


def test_channels_last_training_step_matches_contiguous(synthetic):
    """--channels_last (images and ResNet in channels_last, as main.py sets it) gives the loss and gradients of
    the contiguous layout."""
    extra = ["--model", "tirg", "--use_bert", "False"]
    args, cl_args = make_args(synthetic, *extra), make_args(synthetic, *extra, "--channels_last", "True")
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    batch = loader_batches(trainset, args, 1, workers=0)[0]
    (m, o, s), (mc, oc, sc) = _twin_models(args, trainset)
    mc.img_model.to(memory_format=torch.channels_last)  # as main.run_main
    layouts = []
    mc.img_model.conv1.register_forward_pre_hook(
        lambda mod, inp: layouts.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    loss, grad = _step(args, m, o, s, batch)
    loss_cl, grad_cl = _step(cl_args, mc, oc, sc, batch)
    assert layouts and all(layouts)  # the images really reached the ResNet in channels_last
    assert mc.img_model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for name in loss:
        assert loss_cl[name] == pytest.approx(loss[name], rel=1e-4, abs=1e-5), name
    assert (grad_cl - grad).norm() <= 1e-3 * grad.norm()  # fp32 summation order only


# ----------------------------------------------------------------------------------------------------------------
# --cuda_graph. On the CPU, CudaGraphStep.replay runs its static-buffer step eagerly (no capture), so these tests check
# the plumbing: warm-up, static inputs, recapture when the learning rate changes, eager fallback for another batch
# shape, and that the text features it looks up outside the graph are the ones the model looks up itself.
def _graph_vs_plain(args, trainset, batches, warmup):
    """The same batches through train_one_step and through a CudaGraphStep, from the same weights and seeds."""
    results = []
    for step_fn in (sgd_step.train_one_step, CudaGraphStep(warmup=warmup)):
        torch.manual_seed(0)
        model, optimizer, scheduler = factory.create_model_and_optimizer(args, trainset.get_all_texts())
        model.loss_generator = torch.Generator().manual_seed(5)
        model.train()
        torch.manual_seed(7)  # the same dropout masks in both runs
        terms = [step_fn(model, b, optimizer, scheduler, args, torch.device("cpu")) for b in batches]
        results.append((model, optimizer, terms, step_fn))
    return results


def test_graph_step_equals_train_one_step_through_recapture_and_odd_batches(synthetic, tiny_bert_32):
    """ComposeAE + BERT with dropout and soft triplets: 7 steps through CudaGraphStep equal 7 plain steps exactly
    (weights, BatchNorm statistics, momentum buffers, every loss term), across a learning-rate decay (recapture)
    and a smaller batch (run eagerly, as a batch whose unreadable images were dropped)."""
    args = make_args(synthetic, "--model", "composeAE", "--use_bert", "True", "--bert_model", tiny_bert_32,
                     "--loss", "soft_triplet", "--learning_rate_decay_frequency", "4", "--cuda_graph", "True")
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    batches = loader_batches(trainset, args, 7, workers=0)
    small = {k: v[:5] for k, v in batches[5].items()}  # 5 of 8 items
    batches[5] = small
    (plain, plain_opt, plain_terms, _), (graphed, graph_opt, graph_terms, step) = \
        _graph_vs_plain(args, trainset, batches, warmup=2)
    assert step.captures == 2  # at step 3 (after the warm-up) and at step 5 (the rate fell x0.1 after 4 steps)
    assert step.captured_lrs == tuple(g["lr"] for g in graph_opt.param_groups)
    assert step.captured_lrs[0] == pytest.approx(0.1 * args.learning_rate)
    for a, b in zip(plain_terms, graph_terms):
        assert a.keys() == b.keys() == {"soft_triplet", "L2_loss", "L2_loss_text", "rot_sym_loss",
                                        "total training loss"}
        assert all(torch.equal(a[k], b[k]) for k in a), (a, b)
    for (name, x), (_, y) in zip(plain.state_dict().items(), graphed.state_dict().items()):
        assert torch.equal(x, y), name
    for p, q in zip(plain.parameters(), graphed.parameters()):
        assert torch.equal(plain_opt.state[p]["momentum_buffer"], graph_opt.state[q]["momentum_buffer"])
    assert not torch.equal(plain.img_model.fc[0].weight, factory.create_model_and_optimizer(
        args, trainset.get_all_texts())[0].img_model.fc[0].weight)  # it trained


def test_graph_step_static_inputs_hold_the_last_batch(synthetic, tiny_bert_32):
    """After a replay the static buffers hold the batch's images and the BERT vectors of its texts; a short batch
    right after the warm-up runs eagerly instead of fixing the captured shape to its size."""
    args = make_args(synthetic, "--model", "tirg", "--use_bert", "True", "--bert_model", tiny_bert_32)
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    batches = loader_batches(trainset, args, 4, workers=0)
    batches[1] = {k: v[:6] for k, v in batches[1].items()}  # 6 of 8 items: two unreadable images dropped
    torch.manual_seed(0)
    model, optimizer, scheduler = factory.create_model_and_optimizer(args, trainset.get_all_texts())
    step = CudaGraphStep(warmup=1)
    for i, b in enumerate(batches):
        step(model, b, optimizer, scheduler, args, torch.device("cpu"))
        assert step.captures == (1 if i >= 2 else 0), i
    assert step.steps == 4 and step.static["src"].shape[0] == args.batch_size
    assert torch.equal(step.static["src"], batches[-1]["source_img"])
    assert torch.equal(step.static["tgt"], batches[-1]["target_img"])
    assert torch.equal(step.static["text"], model.bert(batches[-1]["text"]))
    with pytest.raises(ValueError, match="warm-up"):
        CudaGraphStep(warmup=0)  # SGD would create its momentum buffers inside the capture


def test_precomputed_text_features_need_a_frozen_encoder(synthetic):
    args = make_args(synthetic, "--model", "tirg", "--use_bert", "False")
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    model, _, _ = factory.create_model_and_optimizer(args, trainset.get_all_texts())
    with pytest.raises(ValueError, match="frozen"):
        model.extract_text_feature(torch.zeros(2, 512))


@pytest.mark.parametrize("extra", [[], ["--amp", "True", "--channels_last", "True", "--fuse_image_passes", "True"]])
def test_graph_vs_eager_check_reports_no_difference_on_the_cpu(synthetic, tiny_bert_32, extra):
    """benchmark.graph_vs_eager (the check gpu_bench.sh runs at full size on a GPU) finds the CPU stand-in exact,
    with the fast settings too (static channels_last buffers, one fused image pass)."""
    args = make_args(synthetic, "--model", "composeAE", "--use_bert", "True", "--bert_model", tiny_bert_32,
                     "--learning_rate_decay_frequency", "3", *extra)
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    report = benchmark.graph_vs_eager(args, trainset.get_all_texts(), loader_batches(trainset, args, 5, workers=0),
                                      torch.device("cpu"), warmup=1)
    assert report["captures"] == 2 and report["steps"] == 5
    assert report["loss_max_abs_diff"] == 0.0 and report["weights_max_rel_diff"] == 0.0
    assert report["eager_noise_loss_max_abs_diff"] == 0.0 and report["eager_noise_weights_max_rel_diff"] == 0.0
    assert report["int_buffers_equal"] and len(set(report["eager_losses"])) == 5  # it trained
    assert not torch.backends.cudnn.deterministic  # the check put the setting back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="captures a CUDA graph: needs a GPU (run by gpu_bench.sh)")
@pytest.mark.parametrize("extra", [[], ["--amp", "True", "--channels_last", "True", "--fuse_image_passes", "True"],
                                   ["--loss", "soft_triplet"]])
def test_captured_cuda_graph_step_matches_eager_on_gpu(synthetic, tiny_bert_32, extra):
    """On a GPU: the captured and replayed step gives the losses and weights of eager steps (dropout off), up to
    float summation order, across a recapture at a learning-rate change (4 steps: 2 eager warm-up steps, a capture,
    a recapture). With soft triplets this also asks that a replay draws the triplets eager code would have drawn
    (PyTorch's graph-safe generator offsets). bf16 kernels may round differently between runs: hence the wider
    tolerance under --amp."""
    args = make_args(synthetic, "--model", "composeAE", "--use_bert", "True", "--bert_model", tiny_bert_32,
                     "--learning_rate_decay_frequency", "3", "--device", "cuda", *extra)
    trainset, _ = datasets.build_datasets("mitstates", synthetic, image_size=S, seed=0)
    report = benchmark.graph_vs_eager(args, trainset.get_all_texts(), loader_batches(trainset, args, 4, workers=0),
                                      torch.device("cuda"), warmup=2)
    assert report["captures"] == 2 and report["int_buffers_equal"], report
    tol = 2e-2 if "--amp" in extra else 1e-4
    assert report["loss_max_abs_diff"] <= tol * max(map(abs, report["eager_losses"])), report
    assert report["weights_max_rel_diff"] <= tol, report


# ----------------------------------------------------------------------------------------------------------------
EXPECTED_KEYS = {"train_samples_per_s", "train_step_ms", "eval_queries_per_s", "eval_seconds", "peak_memory_bytes",
                 "peak_memory_kind", "settings", "data", "timings_s", "loss_finite"}
EXPECTED_SETTINGS = {"model", "text_encoder", "bert_model", "batch_size", "amp", "channels_last", "image_cache",
                     "workers", "compile", "device", "device_name", "torch_version", "image_size"}


def test_benchmark_cpu_preset_prints_one_json(tmp_path, capsys):
    data_dir, prof = str(tmp_path / "bench"), str(tmp_path / "prof")
    rc = benchmark.main(["--size", "cpu", "--device", "cpu", "--data_dir", data_dir, "--bert_model", "random-bert-tiny",
                         "--batch_size", "8", "--iters", "2", "--warmup", "1", "--amp", "False", "--eval",
                         "--image_cache", "auto",
                         "--profile", prof, "--profile_steps", "1", "--output", str(tmp_path / "out.json")])
    assert rc == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # stdout is exactly one JSON object
    assert EXPECTED_KEYS <= set(result) and EXPECTED_SETTINGS <= set(result["settings"])
    assert result["train_samples_per_s"] > 0 and result["eval_queries_per_s"] > 0 and result["peak_memory_bytes"] > 0
    assert result["train_samples"] == 2 * 8 and result["loss_finite"]
    ops = result["dispatched_ops"]  # one ComposeAE step: two ResNet-18 passes forward and backward, and more
    assert ops["ops_per_step"] > 300 and ops["top_ops"]["convolution"] == 2 * 20 + 2  # 20 convs per ResNet + 2 Conv1d
    s, d = result["settings"], result["data"]
    assert (s["model"], s["text_encoder"], s["batch_size"], s["amp"], s["channels_last"], s["device"]) == \
        ("composeAE", "bert", 8, False, False, "cpu")
    assert s["image_cache"] == os.path.abspath(os.path.join(data_dir, "cache")) and os.listdir(s["image_cache"])
    p = benchmark.PRESETS["cpu"]
    n_classes = (p["n_train_nouns"] + p["n_test_nouns"]) * p["adjectives_per_noun"]
    assert d["train_images"] + d["test_images"] == n_classes * p["images_per_class"]
    assert result["eval_queries"] == d["test_queries"] == d["test_images"] * (p["adjectives_per_noun"] - 1)
    assert os.path.isfile(result["profile"]["trace"]) and result["profile"]["top_ops"]
    assert "benchmark/train_one_step" in result["profile"]["regions"]
    with open(tmp_path / "out.json") as f:
        assert json.load(f)["settings"] == s


def test_full_preset_matches_reference_test_split():
    """The full preset reproduces the reference's test split: 3,528 images and 17,640 queries, ~14.3k images."""
    p = benchmark.PRESETS["full"]
    test_images = p["n_test_nouns"] * p["adjectives_per_noun"] * p["images_per_class"]
    total = (p["n_train_nouns"] + p["n_test_nouns"]) * p["adjectives_per_noun"] * p["images_per_class"]
    assert test_images == benchmark.REFERENCE["eval_gallery"]
    assert test_images * (p["adjectives_per_noun"] - 1) == benchmark.REFERENCE["eval_queries"]
    assert abs(total - benchmark.REFERENCE["images"]) / benchmark.REFERENCE["images"] < 0.1
    assert p["n_train_nouns"] <= len(synthetic_data.SYNTHETIC_TRAIN_NOUNS)
    assert p["n_test_nouns"] <= len(synthetic_data.SYNTHETIC_TEST_NOUNS)
    assert (p["jpeg_size"], p["image_size"], p["batch_size"], p["workers"]) == (128, 224, 32, 8)


def test_parallel_generation_is_byte_identical(tmp_path):
    params = dict(seed=3, image_size=24, n_train_nouns=2, n_test_nouns=1, adjectives_per_noun=3, images_per_class=2)
    serial, parallel = str(tmp_path / "serial"), str(tmp_path / "parallel")
    synthetic_data.generate_synthetic(serial, **params)
    synthetic_data.generate_synthetic(parallel, num_workers=2, **params)  # benchmark.py's way: 9 class jobs

    def tree(root):
        out = {}
        for folder, _, files in os.walk(root):
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
        return out

    a, b = tree(serial), tree(parallel)
    assert len(a) == 3 * 3 * 2 + 1 and a == b
    manifest = os.path.join(parallel, synthetic_data.SYNTHETIC_MANIFEST)
    mtime = os.path.getmtime(manifest)
    synthetic_data.generate_synthetic(parallel, **params)  # recognised as its own output: not rewritten
    assert os.path.getmtime(manifest) == mtime


def test_random_bert_covers_synthetic_words(tmp_path):
    from transformers import AutoTokenizer, BertConfig

    path = benchmark.make_random_bert(str(tmp_path), "random-bert-tiny", benchmark.synthetic_words())
    assert benchmark.make_random_bert(str(tmp_path), "random-bert-tiny", benchmark.synthetic_words()) == path
    tok = AutoTokenizer.from_pretrained(path)
    for word in benchmark.synthetic_words():
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert ids and tok.unk_token_id not in ids, word
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["hidden_size"] == 128
    base = BertConfig(**benchmark.RANDOM_BERTS["random-bert-base"])  # bert-base-uncased's shape
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads, base.intermediate_size) == \
        (12, 768, 12, 3072)


def test_summary_table_reports_ratios_and_targets(tmp_path):
    def result(samples, eval_q, batch, frac):
        return {"train_samples_per_s": samples, "train_step_ms": 1.0, "eval_queries_per_s": eval_q,
                "peak_memory_gib": 1.0, "fraction_of_ceiling": frac, "host_syncs_per_step": 2.0,
                "data_wait_fraction": 0.1,
                "settings": {"batch_size": batch, "amp": True, "channels_last": True, "image_cache": "/c",
                             "workers": 8, "compile": False, "eval_batch_size": batch, "device_name": "GPU",
                             "torch_version": "x", "cuda_version": "y", "cpu_count": 16, "image_size": 224},
                "data": {"train_images": 1, "test_images": 2, "test_queries": 10000, "jpeg_size": 128}}
    for stem, r in {"bench_a": result(400.0, 900.0, 32, None), "bench_b": result(1800.0, 12000.0, 32, 0.74),
                    "bench_c": result(4000.0, 20000.0, 256, 0.667),
                    "bench_h": {**result(2000.0, 12000.0, 32, 0.82), "graph_check": {
                        "steps": 6, "captures": 1, "loss_max_abs_diff": 2e-6, "weights_max_rel_diff": 3e-5,
                        "worst_tensor": "a", "int_buffers_equal": True, "eager_noise_loss_max_abs_diff": 0.0,
                        "eager_noise_weights_max_rel_diff": 1e-6}}}.items():
        with open(tmp_path / f"{stem}.json", "w") as f:
            json.dump(r, f)
    (tmp_path / "ceiling.json").write_text(json.dumps({"ceiling_images_per_s": {"32": 5000.0, "256": 12500.0}}))
    (tmp_path / "steps.tsv").write_text("bench_a\tok\t10\nbench_d\tfailed (rc=1; see bench_d.log)\t3\n"
                                        "bench_b_cudnn\tskipped (time budget: 3s left, needs 20s)\t0\n")
    run = tmp_path / "runs" / "x_recall_plain_s0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"latest": {"test recall_top1_correct_composition": 0.5}}))
    table = benchmark.summarize(str(tmp_path))
    rows = {line.split("|")[1].strip()[:3]: line for line in table.splitlines() if line.startswith("| (")}
    assert "samples/s >= 1700: yes" in rows["(b)"] and "10.7x" in rows["(b)"]  # 1800 / 169
    assert ">= 70% of ceiling: NO" in rows["(c)"] and "67%" in rows["(c)"]
    assert "failed (rc=1" in rows["(d)"]
    assert "20,000" in rows["(e)"] and ">= 10,000: yes" in rows["(e)"]
    assert "| recall_top1_correct_composition | 0.5000 |" in table and "0.0050" in table  # binomial s.e.
    assert "skipped (time budget" in rows["(b2"] and "(f)" not in rows  # optional rows only when they ran
    assert "not run" in rows["(g)"]  # a main row that did not run says so
    assert "samples/s >= 1700: yes" in rows["(h)"]
    assert "Graph check (bench_h: 6 batches" in table and "weights max rel diff 3e-05 (a)" in table
    assert "eager against eager: loss 0, weights 1e-06" in table
    assert "b256: 12,500 images/s (issue: 11,998)" in table
