"""``retrieve.py``'s queries: one ``--image`` and ``--text``, or the lines of a ``--queries`` CSV file
(``image,text[,target]``, paths absolute or relative to the CSV's folder), each checked before the model is loaded:
the image exists, is a regular file and decodes; the text is not empty; a target exists."""
from __future__ import annotations

import argparse
import csv
import io
import os

from errors import UserInputError
from image_cache import BadImageError, load_rgb_uint8
from retrieval_datasets.base import read_utf8_text

__all__ = ["read_queries"]


def _check_image(path: str, where: str) -> None:
    if not os.path.exists(path):
        raise UserInputError(f"{where}{path} does not exist")
    if not os.path.isfile(path):  # a folder, FIFO, socket or device: opening a FIFO would wait for a writer
        raise UserInputError(f"{where}{path} is not a regular file; pass an image file")
    try:
        load_rgb_uint8(path, 8)
    except BadImageError:
        raise UserInputError(f"{where}{path} cannot be read as an image") from None


def _read_utf8(path: str, flag: str) -> str:
    """The text of the UTF-8 file ``path`` (a leading byte-order mark dropped); a missing or non-regular file, or
    one in another encoding, is a UserInputError naming the file (and the byte and its offset in the file)."""
    if not os.path.exists(path):
        raise UserInputError(f"{flag} {path} does not exist")
    if not os.path.isfile(path):
        raise UserInputError(f"{flag} {path} is not a regular file; pass a CSV file")
    return read_utf8_text(path)


def read_queries(args: argparse.Namespace) -> list[dict]:
    """``[{image (as given), path (absolute), text, target (absolute or None), target_given}]``, checked: every
    image exists and decodes, no text is empty; one error naming the file and line otherwise."""
    if args.queries is None:
        if not args.text.strip():
            raise UserInputError("--text is empty: the query needs a modification text")
        path = os.path.abspath(os.path.expanduser(args.image))
        _check_image(path, "--image: ")
        return [{"image": args.image, "path": path, "text": args.text.strip(), "target": None}]
    csv_path = args.queries
    folder = os.path.dirname(os.path.abspath(csv_path))
    queries = []
    with io.StringIO(_read_utf8(csv_path, "--queries"), newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        if not header:
            raise UserInputError(f"{csv_path} is empty: expected the header image,text[,target] and one query a line")
        missing = [c for c in ("image", "text") if c not in header]
        if missing:
            raise UserInputError(f"{csv_path}: the header lacks {', '.join(missing)}; expected image,text[,target]")
        reader.fieldnames = header
        for raw in reader:
            line = reader.line_num
            if None in raw:
                raise UserInputError(f"{csv_path}, line {line}: more cells than the header's {len(header)} columns")
            row = {k: (v or "").strip() for k, v in raw.items()}
            if not any(row.values()):
                continue
            where = f"{csv_path}, line {line}: "
            if not row["image"]:
                raise UserInputError(f"{where}no image")
            if not row["text"]:
                raise UserInputError(f"{where}empty text: a query needs a modification text")
            path = os.path.normpath(os.path.join(folder, os.path.expanduser(row["image"])))
            _check_image(path, where)
            target = None
            if row.get("target"):
                target = os.path.normpath(os.path.join(folder, os.path.expanduser(row["target"])))
                if not os.path.isfile(target):
                    raise UserInputError(f"{where}target {target} does not exist")
            queries.append({"image": row["image"], "path": path, "text": row["text"], "target": target,
                            "target_given": row.get("target") or None})
    if not queries:
        raise UserInputError(f"{csv_path} has no queries: add lines image,text[,target] after the header")
    return queries
