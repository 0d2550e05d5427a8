"""Several test-time adaptation recipes against one source model, into one per-domain error table.

    python -m ssl_lightning.methods.tta.compare --source_ckpt runs/cifar10-classifier/checkpoints/last.ckpt \\
        --configs configs/tta/cifar10c_source.yaml configs/tta/cifar10c_bn_adapt.yaml configs/tta/cifar10c_tent.yaml \\
        --root runs/cifar10c [-- --data.init_args.protocol gradual ...]

Each recipe runs as its own ``python -m ssl_lightning test`` process (run ``<root>/<recipe name>``, which
writes its ``tta_errors.csv`` and ``tta_summary.json``); arguments after ``--`` go to every run. The
combined table (a column per method, a row per domain, the mean) is printed and written to
``<root>/tta_errors.csv`` and ``.md``, with each method's time per 10,000 images under it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from ssl_lightning.cli import split_passthrough
from ssl_lightning.methods.tta.report import read_error_table, write_error_table


def run_recipe(config: Path, source_ckpt: str, root: Path, extra: list[str]) -> Path:
    """One ``test`` run of ``config``; returns its run directory."""
    name = config.stem
    command = [sys.executable, "-m", "ssl_lightning", "test", "--config", str(config), "--model.source_ckpt",
               source_ckpt, "--run_name", name, "--root", str(root), *extra]
    print(f"compare: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    return root / name


def combine(runs: list[Path], root: Path) -> str:
    """Merge the runs' tables (their domains must agree) into ``<root>/tta_errors.{csv,md}``."""
    domains: list[str] | None = None
    columns: dict[str, list[float]] = {}
    speeds = []
    for run in runs:
        run_domains, errors = read_error_table(run / "tta_errors.csv")
        if domains is not None and run_domains != domains:
            raise ValueError(f"{run} ran on other domains ({run_domains}) than the first run ({domains}): give every "
                             "recipe the same data settings")
        domains = run_domains
        for method, values in errors.items():
            column = method if method not in columns else f"{method} ({run.name})"
            columns[column] = values
            summary = json.loads((run / "tta_summary.json").read_text())
            speeds.append(f"{column} {summary['seconds_per_10k_images']:.1f} s")
    note = "Time per 10,000 images (test loop): " + ", ".join(speeds) + "."
    return write_error_table(root, domains or [], columns, note=note)


def main(argv: list[str] | None = None) -> str:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ssl_lightning.methods.tta.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source_ckpt", required=True, help="the source classifier's checkpoint")
    parser.add_argument("--configs", nargs="+", required=True, type=Path, help="TTA recipes (configs/tta/*.yaml)")
    parser.add_argument("--root", type=Path, default=Path("runs/tta"), help="folder of the runs and the table")
    args = parser.parse_args(own)
    missing = [str(config) for config in args.configs if not config.is_file()]
    if missing:
        parser.error(f"recipe(s) not found: {', '.join(missing)}")
    runs = [run_recipe(config, args.source_ckpt, args.root, extra) for config in args.configs]
    table = combine(runs, args.root)
    print(f"\nError (%) per domain, {len(runs)} methods -> {args.root / 'tta_errors.csv'}\n{table}")
    return table


if __name__ == "__main__":
    main()
