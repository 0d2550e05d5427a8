"""Multi-round self-distillation (Borup and Andersen 2021): one command trains every round of
``GuidedSelfDistillation``, each a fresh student taught by the previous round's final checkpoint.

    python -m ssl_lightning.methods.supervised.rounds --config configs/cifar10/guided_self_distillation.yaml \\
        --rounds 5 --run_name cifar10-gsd [--root runs] [--alpha 0.6] [--seed 0] [-- extra CLI arguments]

Round r is the CLI run ``<root>/<run_name>/round_<r>`` (``ssl_lightning fit ... --root
<root>/<run_name> --run_name round_<r>``) with seed ``seed + r``, so every student starts from another
random initialisation; round r >= 1 gets ``--model.init_args.teacher_ckpt`` round r-1's
``checkpoints/last.ckpt``, the checkpoint Lightning writes at the end of training. Arguments after ``--`` go
to every run. After its fit a round is tested (``ssl_lightning test`` on that checkpoint, which
writes ``test_top1.json``, ``test_top5.json`` and ``test_ece.json`` into the round's run), then
``round_<r>/round.json`` records the metrics, the checkpoint, the teacher, alpha and the seed. At the end
``<root>/<run_name>/rounds.json`` and ``rounds.md`` hold every round, and the table is printed.
The runs go through the CLI in this process, one after the other (a process per run would pay
the imports again each time).

Rerunning the same command resumes: a round with ``round.json`` is done and never retrained; the first
round without it runs again in its own run directory, so ``fit`` resumes from that run's newest
checkpoint (or finishes at once if it had ended), and the later rounds follow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from ssl_lightning.cli import main as cli
from ssl_lightning.cli import split_passthrough

METHOD = "GuidedSelfDistillation"
METHOD_CLASS_PATHS = {METHOD, f"ssl_lightning.methods.supervised.{METHOD}",
                      f"ssl_lightning.methods.supervised.guided_self_distillation.{METHOD}"}
ROUND_FILE = "round.json"
#: the checkpoint Lightning's ModelCheckpoint (save_last) writes when a fit ends: the teacher of the next round
FINAL_CHECKPOINT = Path("checkpoints") / "last.ckpt"
#: what ``test`` of a supervised method writes into its run (percent), read into round.json
METRICS = ("test_top1", "test_top5", "test_ece")
#: arguments the driver sets per round; in the extra arguments they would contradict it
DRIVER_SETS = {"--run_name": "--run_name", "--root": "--root", "--seed_everything": "--seed",
               "--model.init_args.teacher_ckpt": None, "--model.teacher_ckpt": None,
               "--model.init_args.alpha": "--alpha", "--model.alpha": "--alpha", "--ckpt_path": None,
               "--model": "--config", "--model.class_path": "--config", "--config": "--config (before `--`)"}


class RoundsError(SystemExit):
    """A reason the rounds cannot go on, said plainly (exit status 1 with the message)."""


def read_configs(configs: list[Path]) -> dict[str, Any]:
    """The model's class path and init_args, the seed, merged over the configs (later ones win)."""
    merged: dict[str, Any] = {"class_path": None, "init_args": {}, "seed": None}
    for config in configs:
        if not config.is_file():
            raise RoundsError(f"rounds: config not found: {config}")
        content = yaml.safe_load(config.read_text()) or {}
        model = content.get("model")
        if isinstance(model, str):
            merged["class_path"] = model
        elif isinstance(model, dict):
            merged["class_path"] = model.get("class_path", merged["class_path"])
            merged["init_args"].update(model.get("init_args") or {})
        if "seed_everything" in content:
            merged["seed"] = content["seed_everything"]
    if merged["class_path"] not in METHOD_CLASS_PATHS:
        found = merged["class_path"] or "no model"
        raise RoundsError(f"rounds: the config ({', '.join(map(str, configs))}) trains {found}; multi-round "
                          f"self-distillation needs model: {METHOD} (configs/cifar10/guided_self_distillation.yaml).")
    teacher = {key: value for key, value in merged["init_args"].items()
               if key in ("teacher_ckpt", "teacher_timm") and value is not None}
    if teacher:
        raise RoundsError(f"rounds: the config sets {teacher}; the driver gives each round its teacher (round 0 "
                          "has none). Remove it from the config.")
    return merged


def check_extra(extra: list[str]) -> None:
    for token in extra:
        name = token.split("=", 1)[0]
        if name in DRIVER_SETS:
            instead = DRIVER_SETS[name]
            hint = f" use the driver's {instead} instead" if instead else " the driver sets it for each round"
            raise RoundsError(f"rounds: {name} after `--` would contradict the driver:{hint}.")


def finished_round(run: Path, round_index: int, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The record of a finished round (checked against this command), or None if it has not finished."""
    path = run / ROUND_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if not Path(record["checkpoint"]).is_file():
        raise RoundsError(
            f"rounds: round {round_index} finished ({path}), but its checkpoint {record['checkpoint']} is missing. "
            f"Restore it, or delete {path} to train round {round_index} again (and the later rounds' {ROUND_FILE}, "
            "since they learned from it)."
        )
    differing = {key: (record.get(key), value) for key, value in expected.items()
                 if not _same(key, record.get(key), value)}
    if differing:
        said = "; ".join(f"{key} was {was}, now {now}" for key, (was, now) in differing.items())
        raise RoundsError(f"rounds: round {round_index} ({path}) was trained otherwise than this command asks "
                          f"({said}). Rerun with the same arguments, or choose another --run_name.")
    return record


def _same(key: str, recorded: Any, wanted: Any) -> bool:
    if key == "teacher_ckpt" and recorded is not None and wanted is not None:
        return Path(recorded).resolve() == Path(wanted).resolve()  # the same file, however the root was spelled
    return recorded == wanted


def run_cli(subcommand: str, arguments: list[str], round_index: int) -> None:
    """One CLI run in this process; an argument error (the CLI's exit) ends the rounds with its reason."""
    print(f"rounds: round {round_index}: ssl_lightning {subcommand} {' '.join(arguments)}", flush=True)
    # The run's command line, as if typed (LightningCLI reads sys.argv, and warns when given both).
    driver_argv, sys.argv = sys.argv, [sys.argv[0], subcommand, *arguments]
    try:
        cli()
    except SystemExit as stop:
        if stop.code not in (None, 0):
            raise RoundsError(f"rounds: round {round_index}'s {subcommand} stopped (exit status {stop.code}; the "
                              "reason is above). Rerun the same command to go on: the round resumes from its newest "
                              "checkpoint.") from None
    finally:
        sys.argv = driver_argv


def train_round(run: Path, round_index: int, expected: dict[str, Any], common: list[str]) -> dict[str, Any]:
    has_checkpoints = any((run / "checkpoints").glob("*.ckpt")) or any(run.glob("hpc_ckpt_*.ckpt"))
    teacher = expected["teacher_ckpt"]
    print(f"rounds: round {round_index}: " + ("resuming its run from its newest checkpoint" if has_checkpoints else
          "a fresh student") + f", seed {expected['seed']}, teacher {teacher or 'none (the labels alone)'}", flush=True)
    run_cli("fit", common, round_index)
    checkpoint = run / FINAL_CHECKPOINT
    if not checkpoint.is_file():
        raise RoundsError(f"rounds: round {round_index}'s fit ended without {checkpoint}, the next round's teacher. "
                          "Leave checkpointing on (trainer.enable_checkpointing) and the CLI's checkpoint callback.")
    for metric in METRICS:  # a stale file from an earlier attempt must not pass for this test's result
        (run / f"{metric}.json").unlink(missing_ok=True)
    run_cli("test", [*common, "--ckpt_path", str(checkpoint)], round_index)
    metrics = {}
    for metric in METRICS:
        path = run / f"{metric}.json"
        metrics[metric] = json.loads(path.read_text())["value"] if path.is_file() else None
    record = {"round": round_index, **expected, "checkpoint": str(checkpoint), "resumed": has_checkpoints,
              "metrics": metrics, "fit_arguments": common}
    write_atomically(run / ROUND_FILE, json.dumps(record, indent=2) + "\n")
    return record


def summary_table(records: list[dict[str, Any]]) -> str:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = ["| round | teacher | alpha | seed | test top-1 (%) | test top-5 (%) | test ECE (%) |",
             "|---|---|---|---|---|---|---|"]
    for record in records:
        index, metrics = record["round"], record["metrics"]
        teacher, alpha = ("-", "-") if index == 0 else (f"round {index - 1}", record["alpha"])
        lines.append(f"| {index} | {teacher} | {alpha} | {record['seed']} | {percent(metrics['test_top1'])} | "
                     f"{percent(metrics['test_top5'])} | {percent(metrics['test_ece'])} |")
    note = ("\nTest metrics of each round's final checkpoint on the DataModule's held-out split (the one validation "
            "uses); round 0 learns from the labels alone.\n")
    return "\n".join(lines) + "\n" + note


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def default_alpha() -> float:
    import inspect

    from ssl_lightning.methods.supervised.guided_self_distillation import GuidedSelfDistillation

    return inspect.signature(GuidedSelfDistillation).parameters["alpha"].default


def main(argv: list[str] | None = None) -> str:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m ssl_lightning.methods.supervised.rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, type=Path, help="recipe(s), as for fit")
    parser.add_argument("--rounds", type=int, required=True, help="rounds in all, round 0 (the labels alone) included")
    parser.add_argument("--run_name", required=True, help="the runs live in <root>/<run_name>/round_<r>")
    parser.add_argument("--root", type=Path, default=Path("runs"), help="folder that holds the runs")
    parser.add_argument("--alpha", type=float, default=None, help="weight of the labels in rounds >= 1 (default: "
                        "the config's, else the method's 0.6)")
    parser.add_argument("--seed", type=int, default=None, help="round r trains with seed + r (default: the config's "
                        "seed_everything, else 0)")
    args = parser.parse_args(own)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (round 0 trains on the labels alone), got {args.rounds}")
    if not args.run_name or Path(args.run_name).name != args.run_name:
        parser.error(f"--run_name must be a plain directory name (no '/'), got {args.run_name!r}")
    config = read_configs(args.config)
    check_extra(extra)
    alpha = args.alpha if args.alpha is not None else config["init_args"].get("alpha", None)
    alpha = default_alpha() if alpha is None else float(alpha)
    if not 0.0 <= alpha <= 1.0:
        parser.error(f"alpha weighs the labels against the teacher and must be in [0, 1], got {alpha}")
    seed = config["seed"] if args.seed is None else args.seed
    seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0

    group = args.root / args.run_name
    records: list[dict[str, Any]] = []
    teacher: str | None = None
    for round_index in range(args.rounds):
        run = group / f"round_{round_index}"
        # round 0 learns from the labels alone: alpha plays no part in it
        expected = {"alpha": alpha if round_index else None, "seed": seed + round_index, "teacher_ckpt": teacher}
        record = finished_round(run, round_index, expected)
        if record is not None:
            print(f"rounds: round {round_index}: done ({run / ROUND_FILE}), not retrained", flush=True)
        else:
            common = [arg for path in args.config for arg in ("--config", str(path))]
            common += [*extra, "--run_name", run.name, "--root", str(group), "--seed_everything",
                       str(expected["seed"]), "--model.init_args.alpha", str(alpha)]
            common += ["--model.init_args.teacher_ckpt", teacher] if teacher is not None else []
            record = train_round(run, round_index, expected, common)
        records.append(record)
        teacher = record["checkpoint"]
    table = summary_table(records)
    write_atomically(group / "rounds.json", json.dumps({"run_name": args.run_name, "alpha": alpha,
                                                        "rounds": records}, indent=2) + "\n")
    write_atomically(group / "rounds.md", table)
    print(f"\nGuided self-distillation, {len(records)} rounds -> {group / 'rounds.json'}\n{table}", flush=True)
    return table


if __name__ == "__main__":
    main()
