"""The published numbers that report.py shows beside a group of runs: one table of frozen rows.

Each row names the paper, its arXiv id and table, and says, in this project's terms, what it measured: the
``--dataset`` and ``--model`` names, the protocol (see ``PROTOCOLS``), the text encoder and the metric name as
metrics.json writes it; ``value`` is a fraction, as metrics.json holds recalls. ``checked`` is True only for a row
whose value was read in the paper's own table; the others are transcribed from the project's collection of
published numbers and await that check.
"""
from __future__ import annotations

import dataclasses

# What each protocol name means (the query text, the gallery, the split), by dataset.
PROTOCOLS = {
    "modification_text": "the query text is the modification only (TIRG's MIT-States: the target adjective; "
                         "Fashion200k: the one-word change); --use_complete_text_query False",
    "complete_text_query": "the query text holds the target's label (MIT-States: '<adj> <noun>'; Fashion200k: the "
                           "target's caption); --use_complete_text_query True",
    "composeae": "Fashion IQ, ComposeAE's: the categories' validation splits merged into one gallery; "
                 "--fashioniq_protocol composeae",
    "standard": "Fashion IQ, per-category galleries (CLIP4Cir's); --fashioniq_protocol standard",
    "3d_to_3d": "CSS3D: 3-D rendered query images against 3-D rendered gallery images (<dataset_path>/images)",
    "2d_to_3d": "CSS3D: 2-D drawn query images against 3-D rendered gallery images (no mode of this project)",
    "2d_to_2d": "CSS3D: 2-D drawn query and gallery images (this project without <dataset_path>/images)",
}

TIRG_PAPER = "Vo et al., Composing Text and Image for Image Retrieval - An Empirical Odyssey, CVPR 2019"
COMPOSEAE_PAPER = "Anwaar et al., Compositional Learning of Image-Text Query for Image Retrieval, WACV 2021"


@dataclasses.dataclass(frozen=True)
class PublishedRow:
    """One published number, in this project's names."""

    paper: str
    arxiv: str  # arXiv id of the paper
    table: str  # the paper's table that holds the number ("" where not established)
    dataset: str  # this project's --dataset name
    protocol: str  # a key of PROTOCOLS
    model: str  # this project's --model name
    text_encoder: str  # "lstm", or the BERT model's name
    metric: str  # this project's metric name, e.g. 'test recall_top1_correct_composition'
    value: float  # a fraction (0.122 for 12.2 %)
    checked: bool  # read in the paper's table itself

    @property
    def source(self) -> str:
        """Where the number is printed: '<paper>, arXiv <id>, Table <n>' (no table where it is not established)."""
        return f"{self.paper}, arXiv {self.arxiv}" + (f", Table {self.table}" if self.table else "")


def _rows(paper: str, arxiv: str, table: str, dataset: str, protocol: str, model: str, text_encoder: str,
          values: dict[str, float]) -> tuple[PublishedRow, ...]:
    """One row per ``metric: percent`` entry of ``values``, none of them checked yet."""
    return tuple(PublishedRow(paper, arxiv, table, dataset, protocol, model, text_encoder, metric,
                              round(percent / 100, 6), checked=False) for metric, percent in values.items())


def _recalls(split: str, view: str, **percent_at_k: float) -> dict[str, float]:
    """``r1=12.2`` -> {'<split> recall_top1_correct_<view>': 12.2}."""
    return {f"{split} recall_top{k[1:]}_correct_{view}": v for k, v in percent_at_k.items()}


# Transcribed from the papers' numbers as collected in the project's reference notes; each awaits a reading of the
# paper's table (checked=False). Left out: CIRR (its TIRG rows are not transcribed), any ComposeAE number on CSS3D
# (none is published) and on CIRR (a circulating one has shifted columns).
PUBLISHED: tuple[PublishedRow, ...] = (
    *_rows(TIRG_PAPER, "1812.07119", "2", "mitstates", "modification_text", "tirg", "lstm",
           _recalls("test", "composition", r1=12.2, r5=31.9, r10=43.1)),
    *_rows(TIRG_PAPER, "1812.07119", "2", "fashion200k", "modification_text", "tirg", "lstm",
           _recalls("test", "composition", r1=14.1, r10=42.5, r50=63.8)),
    *_rows(TIRG_PAPER, "1812.07119", "2", "css3d", "3d_to_3d", "tirg", "lstm",
           _recalls("test", "composition", r1=73.7)),
    *_rows(TIRG_PAPER, "1812.07119", "2", "css3d", "2d_to_3d", "tirg", "lstm",
           _recalls("test", "composition", r1=46.6)),
    *_rows(COMPOSEAE_PAPER, "2006.11149", "", "mitstates", "complete_text_query", "composeAE", "bert-base-uncased",
           _recalls("test", "composition", r1=13.9, r5=35.3, r10=47.9)),
    *_rows(COMPOSEAE_PAPER, "2006.11149", "", "fashion200k", "complete_text_query", "composeAE",
           "bert-base-uncased", _recalls("test", "composition", r1=22.8, r10=55.3, r50=73.4)),
    # the mean over the three categories ('test' is the Fashion IQ validation split here)
    *_rows(COMPOSEAE_PAPER, "2006.11149", "", "fashionIQ", "composeae", "composeAE", "bert-base-uncased",
           _recalls("test", "mean", r10=11.8, r50=29.4)),
)


def rows_for(dataset: str, model: str) -> list[PublishedRow]:
    """The published rows of ``dataset`` and ``model`` (this project's names), in table order."""
    return [row for row in PUBLISHED if row.dataset == dataset and row.model == model]
