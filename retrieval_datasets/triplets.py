"""Your own (source image, modification text, target image) triplets, listed in a ``triplets.csv``."""
from __future__ import annotations

import csv
import io
import logging
import os
from typing import Any, Sequence

from errors import UserInputError

from .base import DEFAULT_IMAGE_SIZE, RetrievalTask, SplitOptions, read_utf8_text, _RetrievalDataset

logger = logging.getLogger("datasets")  # the name its log lines carry


TRIPLETS_FILE = "triplets.csv"
TRIPLETS_COLUMNS = ("source", "text", "target", "split")
TRIPLETS_SPLITS = ("train", "val", "test")
TRIPLETS_KS = (1, 5, 10, 50)  # recall@100 is added when the gallery has more than 100 images


def triplets_csv_path(path: str) -> str:
    """``<path>/triplets.csv``, or ``path`` itself when it names a .csv file."""
    return path if str(path).lower().endswith(".csv") else os.path.join(path, TRIPLETS_FILE)


def read_triplets_csv(csv_path: str) -> list[dict]:
    """The rows of a triplets file, checked: ``[{source, text, target, split, line}]`` with the image paths made
    absolute (relative ones are relative to the file's folder) and normalised, so one image has one path.

    The file is UTF-8 (a byte-order mark and CRLF line ends are accepted). Raises UserInputError (one line) for a
    missing, unreadable, non-UTF-8 or empty file, a header lacking or repeating a column, a row with too few fields
    or extra non-empty ones (an unquoted comma), text that is not CSV, an unknown split, an empty cell, or listed
    images that do not exist (the first one with its line, and how many are missing).
    """
    if not os.path.isfile(csv_path):
        raise UserInputError(f"{csv_path} is missing: --dataset triplets needs --dataset_path DIR holding "
                             f"{TRIPLETS_FILE} with the header {','.join(TRIPLETS_COLUMNS)}")
    folder = os.path.dirname(os.path.abspath(csv_path))
    reader = csv.reader(io.StringIO(read_utf8_text(csv_path), newline=""))
    try:
        header = next((r for r in reader if any(c.strip() for c in r)), None)  # blank lines before it skipped
        columns, width = _header_columns(csv_path, header)
        rows = [row for raw in reader
                if (row := _checked_row(csv_path, raw, reader.line_num, columns, width, folder))]
    except csv.Error as exc:
        raise UserInputError(f"{csv_path}, line {reader.line_num}: not valid CSV ({exc}); write one "
                             f"{','.join(TRIPLETS_COLUMNS)} row a line, quoting cells that hold commas") from None
    if not rows:
        raise UserInputError(f"{csv_path} has a header but no rows: add one row per (source, text, target) triplet")
    absent: dict[str, int] = {}  # missing image -> first line naming it
    for row in rows:
        for c in ("source", "target"):
            if row[c] not in absent and not os.path.isfile(row[c]):
                absent[row[c]] = row["line"]
    if absent:
        first = min(absent, key=absent.get)
        raise UserInputError(f"{csv_path}, line {absent[first]}: image {first} does not exist ({len(absent)} listed "
                             f"image{'s' if len(absent) > 1 else ''} missing)")
    if not any(r["split"] == "train" for r in rows):
        raise UserInputError(f"{csv_path} has no train rows: training needs rows with split=train")
    return rows


def _header_columns(csv_path: str, header: list[str] | None) -> tuple[dict[str, int], int]:
    """``(column name -> position of each of TRIPLETS_COLUMNS, number of header fields)`` of the header row;
    one-line errors for no header, or one lacking or repeating a column."""
    if not header:
        raise UserInputError(f"{csv_path} is empty: expected the header {','.join(TRIPLETS_COLUMNS)} and one "
                             f"row per (source, text, target) triplet")
    header = [h.strip() for h in header]
    missing = [c for c in TRIPLETS_COLUMNS if c not in header]
    if missing:
        raise UserInputError(f"{csv_path}: the header lacks the column{'s' if len(missing) > 1 else ''} "
                             f"{', '.join(missing)}; expected {','.join(TRIPLETS_COLUMNS)}")
    repeated = [c for c in TRIPLETS_COLUMNS if header.count(c) > 1]
    if repeated:
        raise UserInputError(f"{csv_path}: the header names {', '.join(repeated)} more than once; expected "
                             f"{','.join(TRIPLETS_COLUMNS)} once each")
    return {c: header.index(c) for c in TRIPLETS_COLUMNS}, len(header)


def _checked_row(csv_path: str, raw: list[str], line: int, columns: dict[str, int], width: int,
                 folder: str) -> dict | None:
    """The row ``{source, text, target, split, line}`` of the CSV fields ``raw`` (paths made absolute), None for
    a blank line; one-line errors for a wrong number of fields, an empty cell or an unknown split."""
    if not any(c.strip() for c in raw):
        return None  # a blank line
    needed = max(columns[c] for c in TRIPLETS_COLUMNS) + 1
    if len(raw) < needed or any(c.strip() for c in raw[width:]):
        raise UserInputError(f"{csv_path}, line {line}: {len(raw)} fields, the header has {width}; quote a cell "
                             f"that holds a comma (\"make it red, and bigger\")")
    row: dict[str, Any] = {c: raw[columns[c]].strip() for c in TRIPLETS_COLUMNS}
    empty = [c for c in TRIPLETS_COLUMNS if not row[c]]
    if empty:
        raise UserInputError(f"{csv_path}, line {line}: empty {', '.join(empty)}")
    if row["split"] not in TRIPLETS_SPLITS:
        raise UserInputError(f"{csv_path}, line {line}: unknown split {row['split']!r}; use "
                             f"{', '.join(TRIPLETS_SPLITS)}")
    for c in ("source", "target"):
        row[c] = os.path.normpath(os.path.join(folder, os.path.expanduser(row[c])))
    row["line"] = line
    return row


def warn_self_targets(csv_path: str, rows: Sequence[dict]) -> int:
    """Logs one warning when rows of the file have the target equal to the source (their source is ranked last,
    so they can never be hits and lower recall); the rows are kept. Returns their count."""
    same = [r["line"] for r in rows if r["source"] == r["target"]]
    if same:
        n = len(same)
        consequence = "they can never be hits and lower recall" if n > 1 else "it can never be a hit and lowers recall"
        logger.warning("%s: %d row%s the target equal to the source (first at line %d); %s", csv_path, n,
                       "s have" if n > 1 else " has", min(same), consequence)
    return len(same)


class Triplets(_RetrievalDataset):
    """Your own (source image, modification text, target image) triplets, listed in ``<path>/triplets.csv`` with
    the header ``source,text,target,split`` (split: train, val or test; image paths relative to the file's folder
    or absolute).

    Protocol: the training pairs are the train rows (one item per row, no randomness); a split's gallery is every
    image that appears in its rows, as source or target, once each, in sorted path order; a query is a row, its
    hit the row's target image (by path), its own source image ranked last; recall@1, 5, 10, 50, and 100 when the
    gallery has more than 100 images, as ``recall_top{k}_correct_composition``. The ``test`` split evaluates; a
    file without test rows evaluates on its ``val`` rows. A file's rows whose target is their source are kept, with
    one warning (``warn_self_targets``). ``file_rows``: the file's rows as ``read_triplets_csv`` returned them, to
    build several splits from one reading (and one warning); None reads the file.
    """

    name = "triplets"
    items_per_source = 1

    def __init__(self, path: str, split: str, image_size: int = DEFAULT_IMAGE_SIZE,
                 use_complete_text_query: bool = False, seed: int = 0, image_cache: str | None = None,
                 file_rows: list[dict] | None = None) -> None:
        csv_path = triplets_csv_path(path)
        super().__init__(os.path.dirname(os.path.abspath(csv_path)), split, image_size, use_complete_text_query,
                         seed, image_cache)
        if split not in TRIPLETS_SPLITS:
            raise UserInputError(f"triplets split {split!r} is unknown: use {', '.join(TRIPLETS_SPLITS)}")
        if file_rows is None:
            file_rows = read_triplets_csv(csv_path)
            warn_self_targets(csv_path, file_rows)
        rows = self.file_rows = file_rows
        self.csv_path = csv_path
        self.index_files = [csv_path]  # read_triplets_csv refused missing images: every listed image is present
        mine = [r for r in rows if r["split"] == split]
        if not mine and split == "test":
            mine = [r for r in rows if r["split"] == "val"]
            if mine:
                logger.info("%s has no test rows: evaluating on its %d val rows", csv_path, len(mine))
                self.split = "val"
        if not mine:
            raise UserInputError(f"{csv_path} has no {split} rows" + (" and no val rows: evaluation needs one of "
                                                                       "them" if split == "test" else ""))
        self.rows = mine
        self.image_paths = sorted({r[c] for r in mine for c in ("source", "target")})
        self._path2id = {p: i for i, p in enumerate(self.image_paths)}
        self._set_image_paths(list(self.image_paths), self.name)

    @classmethod
    def _layout(cls) -> str:
        return f"<path>/{TRIPLETS_FILE} with the header {','.join(TRIPLETS_COLUMNS)}"

    def __len__(self) -> int:
        return len(self.rows)

    def get_all_texts(self) -> list[str]:
        return [r["text"] for r in self.rows]

    def __getitem__(self, key: Any) -> dict | None:
        _, index, slot = self._parse_key(key)
        self._check_index(index)
        if slot != 0:
            raise KeyError(f"triplets have one slot per row, got slot {slot}")
        r = self.rows[index]
        return self._item(self._path2id[r["source"]], self._path2id[r["target"]], r["text"], r["text"])

    def _task(self, row_ids: Sequence[int]) -> RetrievalTask:
        rows = [self.rows[i] for i in row_ids]
        paths = sorted({r[c] for r in rows for c in ("source", "target")})
        where = {p: i for i, p in enumerate(paths)}
        ks = TRIPLETS_KS + ((100,) if len(paths) > 100 else ())
        return RetrievalTask(
            image_keys=[self._path2id[p] for p in paths], gallery=list(range(len(paths))),
            query_source=[where[r["source"]] for r in rows], query_text=[r["text"] for r in rows],
            gallery_labels={"composition": paths}, query_targets={"composition": [r["target"] for r in rows]},
            query_exclude=[where[r["source"]] for r in rows], ks=ks)

    def test_task(self) -> RetrievalTask:
        """Every row of the split against every image of the split."""
        return self._task(range(len(self.rows)))

    def train_task(self, n_queries: int, seed: int) -> RetrievalTask:
        """A seeded sample of ``n_queries`` rows against every image of the sampled rows (the same protocol)."""
        return self._task(self._sample_sources(range(len(self.rows)), n_queries, seed))


def build_splits(options: SplitOptions) -> dict[str, Triplets]:
    """``--dataset triplets``: the train rows and the test rows (or the val rows, without test rows). With
    ``--select_on val``: its val rows, with test = its test rows (both needed)."""
    common = options.common()
    train = Triplets(options.path, "train", **common)  # reads the file (and warns) once for all the splits
    splits = {"train": train, "test": Triplets(options.path, "test", file_rows=train.file_rows, **common)}
    if options.val:
        if splits["test"].split != "test":  # no test rows: the val rows are the test split
            raise UserInputError(f"--select_on val: {triplets_csv_path(options.path)} has no test rows, so its val "
                                 f"rows are the test split; add test rows or pass --select_on test")
        splits["val"] = Triplets(options.path, "val", file_rows=train.file_rows, **common)
    return splits
