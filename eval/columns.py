"""The metric columns, declared once: every table of results reads this list.

A column names one number of a metrics block of `metrics.json` (`speak`, `speak_proassist`, `dst`, `dst_never`,
`text`; per dataset and in `mean`) and says where it is shown: the console table of `dst eval` / `dst score`
(`console`: its header), the summary cards of the HTML report (the blocks' rows, in this order), `dst demo`'s
comparison and `summary.json` (`summary`: its key), and the default columns of `dst experiment`'s summary
(`experiment`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Column:
    block: str
    key: str
    label: str
    console: str | None = None  # header in the console table; None: not shown there
    summary: str | None = None  # key in dst demo's summary.json and comparison; None: not shown there
    experiment: bool = False  # a default column of dst experiment's summary (test split, mean over datasets)
    detail: tuple[str, str] | None = None  # (precision, recall) keys shown on hover in the report

    @property
    def path(self) -> str:
        return f"{self.block}.{self.key}"


COLUMNS = (
    Column("speak", "f1", "speaking F1", "speak F1", "speak_f1"),
    Column("speak", "precision", "speaking precision", "P", "speak_precision"),
    Column("speak", "recall", "speaking recall", "R", "speak_recall"),
    Column("speak_proassist", "f1", "speaking F1", "ProAssist F1", "speak_proassist_f1", experiment=True),
    Column("speak_proassist", "precision", "speaking precision"),
    Column("speak_proassist", "recall", "speaking recall"),
    Column("dst", "update_f1", "update F1", "update F1", "update_f1", detail=("update_precision", "update_recall")),
    Column("dst_never", "update_f1", "update F1", "(never)"),
    Column("dst", "joint_accuracy", "joint accuracy", "joint acc", "joint_accuracy", experiment=True),
    Column("dst_never", "joint_accuracy", "joint accuracy", "(never)"),
    Column("dst", "node_accuracy", "node accuracy", summary="node_accuracy"),
    Column(
        "dst",
        "transition_f1",
        "transition F1",
        "trans F1",
        "transition_f1",
        detail=("transition_precision", "transition_recall"),
    ),
    Column("dst", "validity", "validity", summary="validity"),
    Column("text", "Bleu_4", "BLEU-4", "BLEU-4", "bleu_4"),
    Column("text", "CIDEr", "CIDEr", summary="cider"),
    Column("text", "METEOR", "METEOR", summary="meteor", experiment=True),
    Column("text", "semantic_score", "semantic score", summary="semantic_score", experiment=True),
)

# Where a block's own rows are listed (the report's cards pair `speak` with `speak_proassist` and `dst` with
# `dst_never`, row by row).
PAIRED = {"speak_proassist": "speak", "dst_never": "dst"}


def block_rows(block: str) -> list[Column]:
    return [c for c in COLUMNS if c.block == block]


def console_columns() -> list[Column]:
    return [c for c in COLUMNS if c.console]


def summary_columns() -> list[Column]:
    return [c for c in COLUMNS if c.summary]


def value(metrics_block: dict, column: Column):
    """The column's number in one scope of metrics.json (`datasets.X` or `mean`); None where the block is null
    (no DST in the variant, no baseline)."""
    return (metrics_block.get(column.block) or {}).get(column.key)
