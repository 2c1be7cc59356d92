"""Query a trained checkpoint: rank the images of a folder for a source image + modification text.

    python retrieve.py --model_checkpoint CKPT --gallery DIR [--index FILE] --image IMG --text "TEXT" [--top_k 10]
        [--out grid.png] [--json results.jsonl] [--device auto] [--index_dtype float32] [--backend exact]
    python retrieve.py --model_checkpoint CKPT --gallery DIR [--index FILE] --queries queries.csv [--top_k 10]
        [--json results.jsonl] [--out_dir DIR]

Every model setting comes from the checkpoint (this project's or the original code's). The gallery is every image
file under DIR (jpg, jpeg, png, webp, bmp, any case), searched recursively, in sorted path order; its features
are computed in batches with the evaluation's code (``test_retrieval.encode_task``) and, with ``--backend exact``
(the default) and ``--index_dtype float32`` (the default), ranked as the evaluation ranks them (cosine similarity,
ties to the lower gallery position), chunk by chunk of stored rows (``ann.exact_search``: the memory it takes does
not grow with the gallery); a query image that is itself a gallery file is left out of its own results; an entry
named like an image that is not a regular file (a FIFO, a socket, a device, a dangling link, a folder) is skipped
with a warning.

``--index FILE`` keeps the gallery's features between calls (``gallery_index``: FILE is a JSON manifest, the
features a raw file beside it) and encodes only the files added or changed since; a build that was stopped goes
on where it stopped; it replaces only a file that is a retrieve.py index. ``--index_dtype float16`` halves the
stored features (rankings equal up to float16 rounding). ``--backend faiss`` searches an approximate inverted-file
index (faiss-cpu, built beside the manifest and rebuilt when the features change; its recall@10 is measured when it
is built, printed and recorded) and re-ranks its candidates with their exact scores. Every output path is checked
before the model is loaded; missing folders above an output are made.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
from typing import Any, Sequence

import torch

import ann
import checksums
import config
import distributed
import factory
import gallery_index
import test_retrieval
from checkpoint import WriteFailed
from datasets import RetrievalTask
from errors import UserInputError, report_internal_error
from feature_store import DTYPES, IndexDamaged
from gallery import IMAGE_SUFFIXES, scan_gallery
from image_cache import BadImageError, load_rgb_uint8
from gallery_index import load_index, save_index  # noqa: F401  (benchmark.py calls retrieve.load_index and retrieve.save_index)
from retrieve_outputs import check_output_paths, write_outputs
from retrieve_queries import read_queries

logger = logging.getLogger("retrieve")

THUMB_RANGE = (16, 1024)  # --thumb, in pixels


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def add_checkpoint_flags(g: argparse._ArgumentGroup) -> argparse._ArgumentGroup:
    """--model_checkpoint, --ignore_checksum and --bert_model, as retrieve.py and demo.py take them; returns ``g``."""
    g.add_argument("--model_checkpoint", type=str, required=True, help="checkpoint (this project's or the original's)")
    g.add_argument("--ignore_checksum", **config.BOOL, default=False,
                   help="use a checkpoint whose SHA-256 differs from the one listed in the checksums.sha256 beside it")
    g.add_argument("--bert_model", type=str, default=None,
                   help="where the checkpoint's BERT is, if not at the name or folder it was trained with")
    return g


def get_args_parser() -> argparse.ArgumentParser:
    p = config.OneLineParser(prog="retrieve.py", description=__doc__.split("\n\n")[0],
                             formatter_class=config.DefaultsFormatter)
    g = add_checkpoint_flags(p.add_argument_group("model"))
    g.add_argument("--dataset_path", type=str, default=None,
                   help="the checkpoint's training dataset; needed only for an original-code LSTM checkpoint, "
                        "which holds no vocabulary")
    g.add_argument("--device", type=str, default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto = cuda if available")
    g.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default; 1 is faster on a CPU that other jobs share)")
    g = p.add_argument_group("gallery")
    g.add_argument("--gallery", type=str, required=True, help="folder of the gallery images (searched recursively)")
    g.add_argument("--index", type=str, default="", help="file keeping the gallery's features between calls ('' = "
                                                         "encode in memory)")
    g.add_argument("--index_dtype", type=str, default="float32", choices=list(DTYPES),
                   help="stored features: float32 ranks as the evaluation does; float16 halves the index")
    g.add_argument("--backend", type=str, default="exact", choices=list(ann.BACKENDS),
                   help="exact: every stored row compared, in chunks; faiss: an approximate inverted-file index "
                        "(faiss-cpu) whose candidates are re-ranked exactly")
    g.add_argument("--batch_size", type=int, default=32, help="images encoded per batch")
    g.add_argument("--num_workers", type=int, default=0, help="image decoding processes (0 = in this process)")
    g = p.add_argument_group("query: --image and --text, or --queries")
    g.add_argument("--image", type=str, default=None, help="source image of the query")
    g.add_argument("--text", type=str, default=None, help="modification text of the query")
    g.add_argument("--queries", type=str, default=None,
                   help="CSV with the header image,text[,target]; paths absolute or relative to the CSV's folder")
    g = p.add_argument_group("output")
    g.add_argument("--top_k", type=int, default=10, help="results per query")
    g.add_argument("--json", type=str, default="", help="JSON Lines file, one object per query in input order")
    g.add_argument("--out", type=str, default="", help="PNG of the query and its results (one query)")
    g.add_argument("--out_dir", type=str, default="", help="folder for one PNG per query and an index.html")
    g.add_argument("--thumb", type=int, default=128,
                   help=f"thumbnail side of the pictures, in pixels ({THUMB_RANGE[0]}..{THUMB_RANGE[1]})")
    return p


def validate(args: argparse.Namespace) -> None:
    """The flags checked against each other and their ranges, and the checkpoint and gallery found: one
    UserInputError otherwise."""
    if args.queries is not None and (args.image is not None or args.text is not None):
        raise UserInputError("give either --image and --text, or --queries, not both")
    if args.queries is None and (args.image is None or args.text is None):
        raise UserInputError("a query needs --image IMG and --text TEXT (or --queries FILE.csv)")
    if args.out and args.queries is not None:
        raise UserInputError("--out draws one query; with --queries use --out_dir DIR")
    if args.out and not args.out.lower().endswith(".png"):
        raise UserInputError(f"--out {args.out}: the picture is a PNG; name it FILE.png")
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not THUMB_RANGE[0] <= args.thumb <= THUMB_RANGE[1]:
        raise UserInputError(f"--thumb must be {THUMB_RANGE[0]}..{THUMB_RANGE[1]} pixels, got {args.thumb}")
    if args.num_workers < 0 or args.threads < 0:
        raise UserInputError(f"--num_workers and --threads must be >= 0, got {args.num_workers}, {args.threads}")
    if args.backend == "faiss":
        ann.import_faiss()
    if not os.path.isfile(args.model_checkpoint):
        raise UserInputError(f"checkpoint {args.model_checkpoint} does not exist; pass --model_checkpoint PATH")
    if not os.path.isdir(args.gallery):
        raise UserInputError(f"gallery {args.gallery} is not a folder; pass --gallery DIR holding the images")


# ----------------------------------------------------------------------------------------------------------------
# Gallery and index
# ----------------------------------------------------------------------------------------------------------------

class _ImageFiles:
    """``load_image(path)`` as the datasets decode (``load_rgb_uint8``); an unreadable file gives zeros and is
    recorded in ``bad`` (a list shared with the DataLoader's worker processes when there are any)."""

    def __init__(self, image_size: int, bad: Any) -> None:
        self.image_size = image_size
        self.bad = bad

    def load_image(self, path: str) -> torch.Tensor:
        try:
            return load_rgb_uint8(path, self.image_size)
        except BadImageError:
            self.bad.append(path)
            return torch.zeros(3, self.image_size, self.image_size, dtype=torch.uint8)


def encode(model, image_size: int, gallery_paths: Sequence[str], queries: Sequence[dict], *, batch_size: int,
           device: torch.device, num_workers: int,
           progress: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
    """Gallery features (N, D) L2-normalised (``test_retrieval.normalize_rows``), query features (Q, D) and the
    unreadable gallery files, computed by the evaluation's ``encode_task`` (one pass over the images, queries
    composed in batches). ``progress``: its progress bars (None: when there are more than 4 batches of images)."""
    keys = list(dict.fromkeys(list(gallery_paths) + [q["path"] for q in queries]))
    where = {k: i for i, k in enumerate(keys)}
    task = RetrievalTask(image_keys=keys, gallery=[where[p] for p in gallery_paths],
                         query_source=[where[q["path"]] for q in queries], query_text=[q["text"] for q in queries],
                         gallery_labels={}, query_targets={})
    manager = multiprocessing.Manager() if num_workers > 0 and gallery_paths else None
    try:
        images = _ImageFiles(image_size, manager.list() if manager else [])
        query_feats, gallery_feats = test_retrieval.encode_task(
            model, images, task, batch_size=batch_size, device=device, num_workers=num_workers,
            desc="retrieve", progress=len(keys) > 4 * batch_size if progress is None else progress)
        bad = set(images.bad)
    finally:
        if manager is not None:
            manager.shutdown()
    return test_retrieval.normalize_rows(gallery_feats).cpu(), query_feats.cpu(), bad


def _warn_skipped(names: Sequence[str]) -> None:
    names = sorted(names)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    print(f"retrieve.py: warning: skipped {len(names)} unreadable gallery file{'s' if len(names) > 1 else ''}: "
          f"{shown}", file=sys.stderr)


class _GalleryEncoder:
    """``encode`` for the index's builds: relative paths -> (normalised rows (n, D), unreadable positions). Its
    first call encodes the queries with the images, in one ``encode_task`` call as the images of a gallery that
    fits one build chunk always were (the model's features of an image depend, by an ulp, on its batch):
    ``query_feats`` then holds them."""

    def __init__(self, args, model, image_size: int, device: torch.device, queries: list[dict]) -> None:
        self.args, self.model, self.image_size, self.device, self.queries = args, model, image_size, device, queries
        self.query_feats: torch.Tensor | None = None  # (Q, D) from the first call

    def __call__(self, rel_paths: list[str]) -> tuple[torch.Tensor, set[int]]:
        full = [os.path.join(self.args.gallery, p) for p in rel_paths]
        queries = self.queries if self.query_feats is None else []
        feats, query_feats, bad = encode(self.model, self.image_size, full, queries, batch_size=self.args.batch_size,
                                         device=self.device, num_workers=self.args.num_workers, progress=False)
        if self.query_feats is None:
            self.query_feats = query_feats
        return feats, {i for i, p in enumerate(full) if p in bad}


Ranked = tuple[list[str], list[list[tuple[int, float]]], list[tuple[int, float] | None]]


def _target_ranks(args, update: gallery_index.Update, queries: list[dict], query_feats: torch.Tensor,
                  where: dict[str, int], exclude: torch.Tensor) -> list[tuple[int, float] | None]:
    """``(rank, score)`` of each query's target over the whole gallery (``ann.target_ranks``: exact, whatever the
    backend), the query's own image not counted; None for a query without a target in the gallery."""
    targets = torch.tensor([gallery_position(q["target"], args.gallery, where) if q["target"] else -1
                            for q in queries], dtype=torch.long)  # (Q,)
    if not bool((targets >= 0).any()):
        return [None] * len(queries)
    found = ann.target_ranks(update.features, query_feats, targets, exclude)
    return [(r, s) if r > 0 else None for r, s in found]


def _rank_index(args, path: str, update: gallery_index.Update, queries: list[dict],
                query_feats: torch.Tensor) -> Ranked:
    """``(relative paths (G,), [(gallery position, score)] per query, (target rank, score) or None per query)``
    from the index's feature file, by ``--backend``; a query's own image (a gallery file) is left out of its
    results and of its target's rank."""
    paths = update.index["files"]
    where = {f: i for i, f in enumerate(paths)}
    exclude = torch.tensor([gallery_position(q["path"], args.gallery, where) for q in queries],
                           dtype=torch.long)  # (Q,)
    if args.backend == "faiss":
        index, nprobe = gallery_index.faiss_index(path, update.index, update.features, durable=bool(args.index))
        hits = ann.faiss_search(index, update.features, query_feats, args.top_k, exclude, nprobe)
    else:
        hits = ann.exact_search(update.features, query_feats, args.top_k, exclude)
    return paths, hits, _target_ranks(args, update, queries, query_feats, where, exclude)


def _check_readable(args, update: gallery_index.Update, files: Sequence) -> None:
    """UserInputError when no gallery file could be read (a file whose features are not finite was read)."""
    if update.index is None and not update.nonfinite:
        raise UserInputError(f"gallery {args.gallery}: none of its {len(files)} image files can be read")


def search_gallery(args, model, image_size: int, identity: dict, files: list[tuple[str, int, int]],
                   queries: list[dict], device: torch.device,
                   skipped: Sequence[str] = ()) -> Ranked:
    """``(relative paths (G,), [(gallery position, score)] per query, (target rank, score) or None per query)``
    (``_rank_index``): the queries encoded, the index of the gallery ``files`` (``scan_gallery``) brought up to
    date (``gallery_index.update_index``; a throw-away one in a temporary folder without ``--index``), and
    searched by ``--backend``. The unreadable files and the ``skipped`` entries are named in one warning; an index
    whose features turn out not to be finite is rebuilt once."""
    _, query_feats, _ = encode(model, image_size, [], queries, batch_size=args.batch_size, device=device,
                               num_workers=args.num_workers)  # (Q, D): the model's width, and the queries of a
    encoder = _GalleryEncoder(args, model, image_size, device, queries)  # call that encodes no image
    with tempfile.TemporaryDirectory(prefix="retrieve-") as tmp:
        path = args.index or os.path.join(tmp, "index.json")
        kw = dict(durable=bool(args.index), progress=len(files) > 4 * args.batch_size)
        update = gallery_index.update_index(path, identity, args.index_dtype, files, query_feats.shape[1], encoder,
                                            **kw)
        query_feats = query_feats if encoder.query_feats is None else encoder.query_feats
        try:
            if update.bad or skipped:
                _warn_skipped(update.bad + list(skipped))
            _check_readable(args, update, files)
            bad_q = int((~torch.isfinite(query_feats).all(dim=1)).sum())
            if bad_q or update.nonfinite:  # a diverged model: the counts the evaluation gives
                rows = update.index["rows"] if update.index is not None else 0
                raise test_retrieval.NonFiniteFeaturesError(bad_q, len(queries), len(update.nonfinite),
                                                            rows + len(update.nonfinite))
            logger.info("index %s: %d files (%d encoded now)", args.index, update.index["rows"], update.encoded)
            try:
                return _rank_index(args, path, update, queries, query_feats)
            except IndexDamaged as exc:
                gallery_index.notice(f"{path} is damaged ({exc}); rebuilding it")
                update.features.close()
                update = gallery_index.update_index(path, identity, args.index_dtype, files, query_feats.shape[1],
                                                    encoder, rebuild=True, **kw)
                _check_readable(args, update, files)
                return _rank_index(args, path, update, queries, query_feats)
        finally:
            if update.features is not None:
                update.features.close()


# ----------------------------------------------------------------------------------------------------------------
# Ranking, and the run
# ----------------------------------------------------------------------------------------------------------------

def gallery_position(path: str, gallery: str, where: dict[str, int]) -> int:
    """Position of the gallery file that ``path`` resolves to, or -1."""
    real, root = os.path.realpath(path), os.path.realpath(gallery)
    if os.path.commonpath([real, root]) != root:
        return -1
    return where.get(os.path.relpath(real, root).replace(os.sep, "/"), -1)


def rank(query_feats: torch.Tensor, gallery_feats: torch.Tensor, k: int,
         exclude: torch.Tensor) -> list[list[tuple[int, float]]]:
    """``[(gallery position, score)] * min(k, ...)`` per query, as the evaluation ranks: ``test_retrieval.top_k``
    on the normalised gallery (G, D) of ``encode``, the excluded position (the query's own image, -1 for none)
    left out."""
    out: list[list[tuple[int, float]]] = [[] for _ in range(len(exclude))]
    for has in (True, False):  # top_k shortens every row by one when any row excludes an item: two calls
        members = torch.nonzero((exclude >= 0) == has).flatten()  # (n,)
        if members.numel() == 0:
            continue
        scores, indices = test_retrieval.top_k(query_feats[members], gallery_feats, k,
                                               exclude[members] if has else None, gallery_normalized=True)
        for i, q in enumerate(members.tolist()):
            out[q] = list(zip(indices[i].tolist(), scores[i].tolist()))
    return out


def run(args: argparse.Namespace) -> int:
    """Checks every input and output, then builds the checkpoint's model, encodes the gallery (or reuses the
    index) and the queries, ranks and writes the results."""
    validate(args)
    ann.set_threads(args.threads)
    queries = read_queries(args)
    check_output_paths(args, len(queries))
    files, skipped = scan_gallery(args.gallery)
    if not files:
        raise UserInputError(f"gallery {args.gallery} holds no image files ({', '.join(IMAGE_SUFFIXES)}, any case)")
    # a changed or bad checkpoint is refused before any work; the digest is that of the weights read
    sha256, ckpt = checksums.read_verified(args.model_checkpoint, args.ignore_checksum,
                                           lambda: factory.read_model_checkpoint(args.model_checkpoint))
    device = distributed.pick_device(args.device)
    texts: Sequence[str] = ()
    if args.dataset_path:
        margs = config.checkpoint_args(ckpt)
        margs.dataset_path = args.dataset_path
        texts = factory.build_datasets(margs)[0].get_all_texts()
    model, margs, _ = factory.model_from_checkpoint(args.model_checkpoint, device, bert_model=args.bert_model,
                                                    texts=texts, ckpt=ckpt)
    identity = {"checkpoint_sha256": sha256, "image_size": int(margs.image_size), "model": str(margs.model)}
    files, hits_of, target_of = search_gallery(args, model, int(margs.image_size), identity, files, queries, device,
                                               skipped)
    where = {f: i for i, f in enumerate(files)}
    ranked, targets = [], []
    for q, hits, found in zip(queries, hits_of, target_of):
        target = gallery_position(q["target"], args.gallery, where) if q["target"] else None
        ranked.append([{"rank": r + 1, "path": files[g], "score": s,
                        **({} if target is None else {"correct": g == target})} for r, (g, s) in enumerate(hits)])
        targets.append(None if found is None else {"rank": found[0], "score": found[1], "path": files[target]})
    write_outputs(args, queries, ranked, targets)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 on success; 2 (one ``retrieve.py: error:`` line) for bad input; 1 for an output that
    cannot be written or features that are not finite; 130 and one line for Ctrl-C; 1 and one ``retrieve.py: internal error:`` line (the
    traceback in a temporary file) for anything else that fails."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad flag (one line already printed)
        return int(exc.code or 0)
    try:
        return run(args)
    except (UserInputError, WriteFailed, test_retrieval.NonFiniteFeaturesError) as exc:
        print(f"retrieve.py: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UserInputError) else 1  # a full disk or diverged weights: not the input's fault
    except KeyboardInterrupt:  # every output is written whole or not at all
        print("retrieve.py: interrupted; every output file is as it was or complete", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:  # noqa: BLE001 (the entry point's last resort: one line, traceback in a file)
        return report_internal_error("retrieve.py", exc)


if __name__ == "__main__":
    sys.exit(main())
