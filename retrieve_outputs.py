"""``retrieve.py``'s outputs: the checks of every output path before the model is loaded
(``check_output_paths``), and the writers (``write_outputs``): the results table on stdout, the ``--json`` JSON
Lines file, the ``--out`` picture of one query, and ``--out_dir``'s one PNG per query and its ``index.html``."""
from __future__ import annotations

import argparse
import html
import json
import os
from typing import Sequence

import visualize
from errors import UserInputError
from gallery import write_file
from gallery_index import read_index_file

__all__ = ["check_output_paths", "draw_query", "index_page", "missed_target", "write_outputs"]


# ----------------------------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------------------------

def _check_folder(flag: str, path: str, folder: str) -> None:
    """``folder`` (where ``path`` goes, or ``path`` itself for a folder flag) exists as a writable folder, or can be
    made in one: its nearest existing ancestor is a writable folder (not a regular file)."""
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserInputError(f"{flag} {path}: {probe} is not a folder, so nothing can be written below it; "
                             f"pass a path in a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} {path}: the folder {probe} is not writable; pass a path in a writable folder")


def _same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` name one file: the same existing file (links resolved), or the same path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def check_output_paths(args: argparse.Namespace, n_queries: int) -> None:
    """Every output checked before the model is loaded and the gallery encoded: ``--json``, ``--out`` and
    ``--index`` name files and ``--out_dir`` a folder; a missing folder is made when they are written (``mkdir
    -p``). Refused with one UserInputError: a file flag naming a folder, an ``--out_dir`` naming a file (or holding
    a folder of the name of one of its pictures or index.html), a path whose parent is a regular file or is not
    writable, an output that is an input (the checkpoint, ``--queries``, ``--image``) or another output, and an
    existing ``--index`` that is not a gallery index of retrieve.py (``read_index_file``)."""
    outputs = [(flag, path) for flag, path in (("--json", args.json), ("--out", args.out), ("--index", args.index))
               if path]
    for flag, path in outputs:
        if os.path.isdir(path):
            raise UserInputError(f"{flag} {path} is a folder; pass the path of a file")
        _check_folder(flag, path, os.path.dirname(os.path.abspath(path)))
    if args.out_dir:
        if os.path.lexists(args.out_dir) and not os.path.isdir(args.out_dir):
            raise UserInputError(f"--out_dir {args.out_dir} is not a folder; pass a folder (it is made if missing)")
        _check_folder("--out_dir", args.out_dir, args.out_dir)
        for name in ["index.html"] + [f"query_{n:04d}.png" for n in range(1, n_queries + 1)]:
            if os.path.isdir(os.path.join(args.out_dir, name)):
                raise UserInputError(f"--out_dir {args.out_dir} holds a folder {name}, where a result goes; "
                                     f"remove it or pass another --out_dir")
    inputs = [(flag, path) for flag, path in (("--model_checkpoint", args.model_checkpoint),
                                              ("--queries", args.queries), ("--image", args.image)) if path]
    for i, (flag, path) in enumerate(outputs):
        for other_flag, other in inputs + outputs[:i]:
            if _same_file(path, other):
                raise UserInputError(f"{flag} {path} is also {other_flag}, which it would overwrite; pass another "
                                     f"path for {flag}")
    if args.index:
        read_index_file(args.index)


# ----------------------------------------------------------------------------------------------------------------
# Results: table, JSON Lines, pictures, index.html
# ----------------------------------------------------------------------------------------------------------------

def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert("RGB")


def missed_target(results: list[dict], target: dict | None) -> dict | None:
    """``target`` (``{rank, score, path}`` of the query's target over the whole gallery) when it is not among the
    ``results``; None when it is, or when the query has no target in the gallery."""
    if target is None or any(r.get("correct") for r in results):
        return None
    return target


def draw_query(query: dict, results: list[dict], gallery: str, thumb: int, target: dict | None = None):
    """The picture of one query (``visualize.retrieval_picture``): its results, the target framed green, and
    'target at rank R' under the query when ``target`` is outside the results."""
    cells = [visualize.Result(_open_rgb(os.path.join(gallery, r["path"])), r["rank"], r["score"], r.get("correct"),
                              r["path"]) for r in results]
    missed = missed_target(results, target)
    note = f"target at rank {missed['rank']}" if missed else ""
    return visualize.retrieval_picture([visualize.QueryRow(_open_rgb(query["path"]), query["text"], cells, note)],
                                       k=len(cells), thumb=thumb)


INDEX_CSS = """body { font-family: sans-serif; margin: 1em; color: #222; }
.legend { margin: 0 0 1em; }
.green { display: inline-block; width: 0.9em; height: 0.9em; border: 3px solid rgb(0, 190, 0);
  vertical-align: middle; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(min(100%, 32em), 1fr)); gap: 1em; }
figure { margin: 0; }
figcaption { font-size: 0.95em; line-height: 1.3; overflow-wrap: anywhere; margin-bottom: 0.3em; }
img { max-width: 100%; height: auto; }"""
INDEX_LEGEND = ("<p class=\"legend\"><span class=\"green\"></span> a green frame marks the target; "
                "target outside the top k: its rank is written under the query.</p>")


def index_page(queries: list[dict], names: list[str]) -> str:
    """``index.html`` of ``--out_dir``: one self-contained page (inline CSS, no external resource), a legend, and
    a responsive grid of the query pictures ``names``, each captioned with its escaped image name and text."""
    items = [f"<figure><figcaption>{n}. {html.escape(q['image'])}: &ldquo;{html.escape(q['text'])}&rdquo;"
             f"</figcaption>\n<img src=\"{html.escape(name)}\" alt=\"query {n}\"></figure>"
             for n, (q, name) in enumerate(zip(queries, names), 1)]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>retrieve.py results</title>\n<style>\n{INDEX_CSS}\n</style></head><body>\n"
            f"<h1>retrieve.py results</h1>\n{INDEX_LEGEND}\n<div class=\"grid\">\n" + "\n".join(items)
            + "\n</div>\n</body></html>\n")


def write_outputs(args, queries: list[dict], ranked: list[list[dict]],
                  targets: Sequence[dict | None] | None = None) -> None:
    """The results table on stdout (and ``   target PATH at rank R (score S)`` for a target outside the top k),
    then the files ``--json`` (with ``target_rank`` for a query whose target is in the gallery), ``--out`` and
    ``--out_dir`` ask for (checked by ``check_output_paths``; ``WriteFailed`` when one cannot be written).
    ``targets``: ``{rank, score, path}`` of each query's target over the whole gallery, or None."""
    targets = list(targets) if targets is not None else [None] * len(queries)
    for n, (q, results, t) in enumerate(zip(queries, ranked, targets), 1):
        print(f"query {n}: {q['image']} \"{q['text']}\"")
        print(f"{'rank':>6} {'score':>8}  path")
        for r in results:
            mark = "  (target)" if r.get("correct") else ""
            print(f"{r['rank']:>6} {r['score']:>8.4f}  {r['path']}{mark}")
        missed = missed_target(results, t)
        if missed:
            print(f"   target {missed['path']} at rank {missed['rank']} (score {missed['score']:.4f})")
    if args.json:
        def write(f) -> None:
            for q, results, t in zip(queries, ranked, targets):
                obj = {"image": q["image"], "text": q["text"]}
                if q.get("target_given"):
                    obj["target"] = q["target_given"]
                if t is not None:
                    obj["target_rank"] = t["rank"]
                obj["results"] = [{"rank": r["rank"], "path": r["path"], "score": round(r["score"], 6)}
                                  for r in results]
                f.write(json.dumps(obj) + "\n")
        write_file(args.json, write, mode="w")
    if args.out:
        picture = draw_query(queries[0], ranked[0], args.gallery, args.thumb, targets[0])
        write_file(args.out, lambda f: picture.save(f, format="PNG"))
    if args.out_dir:
        names = [f"query_{n:04d}.png" for n in range(1, len(queries) + 1)]
        for name, q, results, t in zip(names, queries, ranked, targets):
            picture = draw_query(q, results, args.gallery, args.thumb, t)
            write_file(os.path.join(args.out_dir, name), lambda f: picture.save(f, format="PNG"))
        page = index_page(queries, names)
        write_file(os.path.join(args.out_dir, "index.html"), lambda f: f.write(page), mode="w")
