"""Result files of evaluations and tests: ``<metric>.json`` and a line of ``results.md`` in the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

RESULTS_HEADER = (
    "| dataset | split | protocol | epochs | metric | value | checkpoint |\n"
    "|---|---|---|---|---|---|---|\n"
)


def write_result(
    trainer: L.Trainer, protocol: str, metric: str, value: float, epochs: int | None, checkpoint: str | None,
    split: str = "val",
) -> None:
    """Write ``<run dir>/<metric>.json`` and append one line to ``<run dir>/results.md`` (rank zero;
    the run directory is ``trainer.default_root_dir``). ``value`` is in percent."""
    if not trainer.is_global_zero:
        return
    record: dict[str, Any] = {
        "dataset": type(trainer.datamodule).__name__, "split": split, "protocol": protocol,
        "epochs": epochs, "metric": metric, "value": round(value, 4), "checkpoint": checkpoint,
    }
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / f"{metric.replace('/', '_')}.json").write_text(json.dumps(record, indent=2) + "\n")
    table = run_dir / "results.md"
    with table.open("a") as file:
        if file.tell() == 0:
            file.write(RESULTS_HEADER)
        file.write("| " + " | ".join("-" if v is None else str(v) for v in record.values()) + " |\n")
