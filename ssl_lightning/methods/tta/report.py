"""The per-domain error table of test-time adaptation: counted during ``test`` (``DomainErrors``),
written as CSV and Markdown (``write_error_table``), one column per method, a row per domain and
their mean (the layout of the mariodoebler/test-time-adaptation benchmark's tables)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric

MEAN_ROW = "mean"


class DomainErrors(Metric):
    """Wrong, labelled and seen images per domain, summed over processes (``dist_reduce_fx="sum"``), so
    the error of a stream split across ranks is that of the whole stream. Unlabelled images (label -1)
    count as seen, not as labelled: a domain without labels has no error (``nan``)."""

    full_state_update = False

    def __init__(self, num_domains: int) -> None:
        super().__init__()
        self.num_domains = num_domains
        for name in ("wrong", "labelled", "seen"):
            self.add_state(name, torch.zeros(num_domains, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Tensor, labels: Tensor, domains: Tensor) -> None:
        labelled = labels >= 0
        self.wrong.index_add_(0, domains, ((predictions != labels) & labelled).long())
        self.labelled.index_add_(0, domains, labelled.long())
        self.seen.index_add_(0, domains, torch.ones_like(domains))

    def compute(self) -> dict[str, Tensor]:
        """``error`` per domain in percent (``nan`` without labels), and the counts."""
        error = 100.0 * self.wrong.double() / self.labelled.double()
        error = torch.where(self.labelled > 0, error, torch.full_like(error, math.nan))
        return {"error": error, "labelled": self.labelled.clone(), "seen": self.seen.clone()}


def mean_error(errors: Sequence[float]) -> float:
    """The mean over domains that have an error (``nan`` if none has)."""
    known = [error for error in errors if not math.isnan(error)]
    return sum(known) / len(known) if known else math.nan


def error_rows(domains: Sequence[str], errors: Mapping[str, Sequence[float]]) -> list[list[str]]:
    """Rows ``[domain, error of each method...]`` then the mean row; errors in percent with two decimals,
    ``n/a`` where a domain had no labels. ``errors`` maps a method's column name to its errors in the
    order of ``domains``."""
    for method, values in errors.items():
        if len(values) != len(domains):
            raise ValueError(f"{method} has {len(values)} domain errors for {len(domains)} domains")
    rows = [[domain] + [_percent(values[row]) for values in errors.values()] for row, domain in enumerate(domains)]
    rows.append([MEAN_ROW] + [_percent(mean_error(values)) for values in errors.values()])
    return rows


def write_error_table(folder: Path, domains: Sequence[str], errors: Mapping[str, Sequence[float]],
                      stem: str = "tta_errors", note: str | None = None) -> str:
    """Write ``<folder>/<stem>.csv`` and ``<folder>/<stem>.md`` and return the Markdown table (with
    ``note`` under it)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = ["domain", *errors]
    rows = error_rows(domains, errors)
    with (folder / f"{stem}.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")
    (folder / f"{stem}.md").write_text(table)
    return table


def read_error_table(path: Path) -> tuple[list[str], dict[str, list[float]]]:
    """The domains and the methods' errors of a ``tta_errors.csv`` (its mean row left out)."""
    with Path(path).open(newline="") as file:
        header, *rows = list(csv.reader(file))
    rows = [row for row in rows if row[0] != MEAN_ROW]
    errors = {method: [_number(row[column]) for row in rows] for column, method in enumerate(header[1:], start=1)}
    return [row[0] for row in rows], errors


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _number(text: str) -> float:
    return math.nan if text == "n/a" else float(text)
