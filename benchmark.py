"""Training and evaluation throughput of this project's own code paths, on synthetic data in the MIT-States layout.

    python benchmark.py --size cpu                                    # tiny, < 1 min on a 2-core CPU
    python benchmark.py --size full --device cuda                     # the reference setup, plain fp32
    python benchmark.py --size full --device cuda --amp --channels_last --image_cache auto --workers 8
    python benchmark.py --size full --model tirg --text lstm --amp --channels_last --image_cache auto
    python benchmark.py --size cpu --profile /tmp/prof                # + torch.profiler trace and top-ops table
    python benchmark.py --mode retrieve --device cpu --threads 1       # one retrieve.py query, 100,000-row index
    python benchmark.py --mode default --threads 1 --seeds 0,1,2       # `python main.py` as a first run, per seed
    python benchmark.py --mode retrieve --gallery_size 1000000 --dim 512 --index_dtype float16 --backend exact faiss

Prints ONE JSON object on stdout (everything else goes to stderr): steady-state training samples/s (after warm-up
iterations; timed with ``torch.cuda.synchronize`` on a GPU), evaluation queries/s (one full
``test_retrieval.evaluate`` of the synthetic test task, image features included), peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, ``ru_maxrss`` on the CPU) and every setting used. ``--mode default``
prints one JSON line per seed instead (``benchmarks.default_run``).

Nothing here re-implements the project: the data is written by ``synthetic.generate_synthetic`` (with a process
pool: byte-identical files), read by ``factory.build_datasets`` / ``EpochBatchSampler`` / ``collate_train``
(optionally through the decode-once ``image_cache``); the test task comes from ``factory.build_tasks``, the model
and optimizer from ``factory.build_model``, as in main.py (flags parsed by ``config.get_args_parser`` +
``config.resolve_defaults``), every step is ``training.make_train_step``'s (``train_one_step``, or
``CudaGraphStep`` with ``--cuda_graph``) and the evaluation is ``test_retrieval.evaluate``.

This module is the command line; the measurements live in the ``benchmarks`` package (``train_speed``,
``eval_speed``, ``retrieval_speed``, ``default_run``, ``resnet_ceiling``, ``report``).

The reference measurement (original code, one H100) used 14,328 synthetic 128-px JPEGs: 3,528 test images with
17,640 queries and 10,800 training images. ``--size full`` writes 14,112 128-px JPEGs (9 training nouns, 3 test
nouns, 6 adjectives each, 196 images per class): the test split is the reference's exactly (3,528 images, 17,640
queries), the training split has 10,584 images (the generator has one ``images_per_class`` for all classes). Images
are resized to ``--image_size`` (224, the original's).

``--bert_model random-bert-base`` writes a randomly initialised BERT with bert-base's shape (transformers
``BertConfig()`` defaults: 12 layers, 768 wide, 12 heads, 3072 intermediate) and a WordPiece vocabulary of the
synthetic words into ``<data_dir>/`` and uses that folder: the compute of bert-base-uncased with no download
(``random-bert-tiny``: 2 layers, 128 wide, for tests). ``all-MiniLM-L6-v2`` and any local folder work as in main.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
from typing import Sequence

import config
import index_bench
from benchmarks.common import PRESETS, REFERENCE, json_text, write_output
from benchmarks.default_run import default_main
from benchmarks.inputs import RANDOM_BERTS, make_random_bert, synthetic_words
from benchmarks.report import summarize
from benchmarks.resnet_ceiling import ceiling_main
from benchmarks.retrieval_speed import retrieve_main
from benchmarks.train_speed import endless_batches, graph_vs_eager, run
from errors import UserInputError, report_internal_error

# The measurements' names that callers reach through this module (the tests among them).
__all__ = ["PRESETS", "RANDOM_BERTS", "REFERENCE", "endless_batches", "get_args_parser", "graph_vs_eager", "main",
           "make_random_bert", "summarize", "synthetic_words"]


def get_args_parser() -> argparse.ArgumentParser:
    """benchmark.py's flags (``benchmarks.common.main_args`` derives main.py's flags for the run from them)."""
    p = argparse.ArgumentParser(prog="benchmark.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    flag = dict(type=config.str2bool, nargs="?", const=True)  # `--amp`, `--amp True` and `--amp False` all work
    p.add_argument("--size", choices=sorted(PRESETS), default="cpu", help="preset: data size, batch, iterations")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--model", default="composeAE", help="composition model (main.py --model)")
    p.add_argument("--text", choices=["bert", "lstm"], default="bert", help="text encoder")
    p.add_argument("--bert_model", default="random-bert-base",
                   help="random-bert-base, random-bert-tiny, all-MiniLM-L6-v2 or a local BERT folder")
    p.add_argument("--loss", default="batch_based_classification",
                   help="base loss (the ComposeAE MIT-States command's)")
    p.add_argument("--batch_size", type=int, default=None, help="training batch size [preset]")
    p.add_argument("--eval_batch_size", type=int, default=0, help="evaluation batch size; 0 = --batch_size (as main)")
    p.add_argument("--amp", default=False, help="bf16 autocast", **flag)
    p.add_argument("--channels_last", default=False, help="channels_last images and ResNet", **flag)
    p.add_argument("--image_cache", default="", help="decode-once uint8 cache folder; auto = <data_dir>/cache; '' off")
    p.add_argument("--workers", type=int, default=None, help="data loader processes [preset]")
    p.add_argument("--compile", default=False, help="torch.compile the image encoder (main.py --compile)", **flag)
    p.add_argument("--cudnn_benchmark", default=False, help="torch.backends.cudnn.benchmark (main.py --cudnn_benchmark)",
                   **flag)
    p.add_argument("--fuse_image_passes", default=False, help="one ResNet pass over query and target images "
                   "(main.py --fuse_image_passes)", **flag)
    p.add_argument("--cuda_graph", default=False, help="capture the training step as a CUDA graph (main.py "
                   "--cuda_graph)", **flag)
    p.add_argument("--allow_tf32", default=True, help="TF32 cuDNN on Ampere+ (main.py --allow_tf32)", **flag)
    p.add_argument("--graph_check", type=int, default=4, help="with --cuda_graph: after the timing, train this many "
                   "batches eagerly and through the graph from the same weights (dropout off) and report the "
                   "differences; 0 = skip")
    p.add_argument("--iters", type=int, default=None, help="timed training iterations [preset]")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations first [preset]")
    p.add_argument("--eval", default=True, help="time one full test_retrieval.evaluate of the test task", **flag)
    p.add_argument("--sync_check_steps", type=int, default=3,
                   help="CUDA: extra steps under torch.cuda.set_sync_debug_mode to count host syncs per step")
    p.add_argument("--image_size", type=int, default=None, help="image side after resize + crop [preset]")
    p.add_argument("--image_weights", default="none", help="ResNet-18 init (main.py --image_weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default="data/benchmark", help="synthetic data, random BERT and caches live here")
    p.add_argument("--gen_workers", type=int, default=0, help="processes writing the synthetic JPEGs; 0 = all CPUs")
    p.add_argument("--profile", default="", metavar="DIR", help="torch.profiler trace + top-ops table of a few steps")
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--prepare_only", default=False, help="write data, image cache and BERT; print paths", **flag)
    p.add_argument("--output", default="", help="also write the JSON to this file")
    p.add_argument("--ceiling", default=False, help="only time a bare ResNet-18 training step (bf16 autocast + "
                   "channels_last, random 224-px images) at batch 32 and 256: this machine's ceiling", **flag)
    p.add_argument("--report", default="", metavar="DIR",
                   help="print the markdown summary of the gpu_bench.sh results in DIR and exit")
    p.add_argument("--mode", choices=["train", "retrieve", "default"], default="train",
                   help="train: training and evaluation throughput; retrieve: one retrieve.py query (encode + "
                        "ranking) against a --gallery_size index of random features; default: `python main.py` "
                        "with no flags in a fresh folder (data generation included), one JSON line per --seeds")
    p.add_argument("--gallery_size", type=int, default=100000, help="--mode retrieve: rows of the index")
    p.add_argument("--repeats", type=int, default=5, help="--mode retrieve: timed queries (after one untimed)")
    p.add_argument("--threads", type=int, default=0,
                   help="--mode retrieve and default: torch CPU threads (0 = torch's default)")
    p.add_argument("--seeds", default="0", help="--mode default: main.py --seed of each run, comma-separated")
    g = p.add_argument_group("gallery index", "--mode retrieve with --backend: the index alone on synthetic vectors "
                             "(index_bench.py), one JSON line per backend, each queried in a fresh process")
    g.add_argument("--backend", nargs="+", default=None, choices=["exact", "faiss"],
                   help="search backends to measure (default: none, i.e. one retrieve.py query with a model)")
    g.add_argument("--dim", type=int, default=512, help="width of the synthetic gallery vectors")
    g.add_argument("--index_dtype", default="float32", choices=["float32", "float16"], help="stored feature type")
    g.add_argument("--uniform", action="store_true",
                   help="uniformly random unit vectors (the worst case, no clusters) instead of 1,000 noisy centres")
    g.add_argument("--index_workdir", default="index_bench_data", help="folder for the generated gallery and index")
    # --mode default: main.py flags added to every run (the tests' short runs); the measurement records them
    p.add_argument("--main_flags", default="", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the mode the flags name and prints its JSON object on stdout (``--report``: the markdown summary);
    returns the exit status (2 and one ``benchmark.py: error:`` line for bad input; 130 and one line for Ctrl-C; 1
    and one ``benchmark.py: internal error:`` line, the traceback in a temporary file, for anything else that
    fails)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    a = get_args_parser().parse_args(argv)
    try:
        return _measure(a)
    except UserInputError as exc:
        print(f"benchmark.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("benchmark.py: interrupted; no measurement printed", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 (the entry point's last resort: one line, traceback in a file)
        return report_internal_error("benchmark.py", exc)


def _measure(a: argparse.Namespace) -> int:
    """The work of ``main``: the summary (``--report``) or one measurement, its JSON printed (and written to
    ``--output``); returns 0."""
    if a.report:
        print(summarize(a.report))
        return 0
    if a.mode == "default":
        return default_mode(a)
    if a.mode == "retrieve" and a.backend:
        if a.gallery_size < 1 or a.dim < 1:
            raise UserInputError("--gallery_size and --dim must be at least 1")
        for backend in a.backend:
            print(json.dumps(index_bench.measure_backend(backend, a.gallery_size, a.dim, a.index_dtype, a.uniform,
                                                         a.seed, a.index_workdir, a.threads)), flush=True)
        return 0
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON only
        result = ceiling_main(a) if a.ceiling else retrieve_main(a) if a.mode == "retrieve" else run(a)
    text = json_text(result)
    if a.output:
        write_output(a.output, text)
    print(text, flush=True)
    return 0


def default_mode(a: argparse.Namespace) -> int:
    """``--mode default``: prints each seed's JSON line as its run ends (``--output``: all lines, at the end);
    returns the exit status (2 and one ``benchmark.py: error:`` line for bad input, 1 for a failed run)."""
    lines = []  # main.py's output goes to a log file in its folder: stdout carries the JSON lines only
    try:
        for result in default_main(a):
            lines.append(json.dumps(result))
            print(lines[-1], flush=True)
    except UserInputError as exc:
        print(f"benchmark.py: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # a main.py run that failed: its output's end is in the message
        print(f"benchmark.py: error: {exc}", file=sys.stderr)
        return 1
    if a.output:
        write_output(a.output, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
