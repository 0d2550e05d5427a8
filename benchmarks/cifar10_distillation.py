"""Evidence for issue 16: knowledge distillation, self-distillation and the SimCLRv2 pipeline on CIFAR-10 at one
CPU budget.

Every row runs its method's recipe through the CLI (in-process, ``run=False``) on the JPEG copy of CIFAR-10
(``../shared/data/cifar10_jpeg.npz``, or a class-stratified subset of it: ``--train-images``, ``--test-images``,
``cifar10_knn.stratified_subset``), with the budget, batch, data and backbone set here, no validation during
the fit, fp32 on the CPU. Then ``test`` scores the (subset of the) test images, un-augmented.

Rows, in this order (the students share ``--epochs``, ``--batch-size``, the data, seed 0 and the student
backbone; only the method, and the optimizer details of its recipe, differ):

  teacher            ``Classifier`` (configs/cifar10/classifier.yaml) on ``--teacher-backbone-kwargs`` for
                     ``--teacher-epochs``: the teacher of KD, DKD and NKD
  baseline           ``Classifier`` on the student backbone: what every student row must beat
  KD, DKD, NKD       configs/cifar10/{kd,dkd,nkd}.yaml, teacher_ckpt = the teacher row's checkpoint; DKD's
                     20-of-240-epoch warm-up of its loss weight scales with the budget: epochs / 12
  PSKD, USKD, SLA,   the teacher-free methods, configs/cifar100/{pskd,uskd,sla,lsskd}.yaml (there are no
  LSSKD              CIFAR-10 recipes for them; the class count links from the data, see CIFAR100_RECIPES).
                     SLA's row is SLA+SD (its single-label head); its SI and AG heads are tested too
                     (``sla_heads``). SLA and LSSKD run the backbone on the 4 rotations of every image:
                     ``backbone_images_per_second`` counts those passes, ``train_images_per_second`` the images
  classifier_10pct   ``Classifier`` on the student backbone, trained on a class-balanced 10% of the training
                     labels alone (label_fraction 0.1, seed 0, unlabelled: drop) for ``--labelled-epochs``
  simclrv2_pretrain  SimCLR with SimCLRv2's 3-layer projector (configs/cifar10/simclrv2_pretrain.yaml) on the
                     student backbone for ``--pretrain-steps``, without labels (its detached online probe
                     sees the same 10% of the labels only); not tested (no classifier)
  simclrv2_finetune  ``FineTune`` (projector_layers 1, configs/cifar10/simclrv2_finetune.yaml) of that
                     checkpoint on the same 10% for ``--labelled-epochs``: compare with classifier_10pct
  simclrv2_distill   KD (configs/cifar10/simclrv2_distill.yaml: T 1, ce_weight 0) of the fine-tuned network
                     into a fresh student backbone, on every training image without labels, for ``--epochs``

Each row: test top-1 / top-5 and ECE in percent (15 equal-width confidence bins, ``SupervisedMethod``'s
``test/ece``; FineTune has no test step, so its forward is scored by ``HeldOutScores`` with the same metrics),
the fit's wall time, images per second, the method's hyperparameters and the CLI arguments beyond the
common ones. The JSON is written after every row, so a run cut short keeps what it measured; ``--resume``
skips the rows already in it (and reruns a row whose producer reruns). Checkpoints live in ``--work-dir``
(git-ignored under benchmarks/results/): KD, DKD and NKD read the teacher's, the pipeline's stages each
other's.

    # a CPU budget (size it from the smoke test's seconds per row and image counts)
    python benchmarks/cifar10_distillation.py --epochs 15 --teacher-epochs 30 --pretrain-steps 3000 \\
        --out benchmarks/results/cifar10_distillation.json
    # continue after an interruption, or redo two rows
    python benchmarks/cifar10_distillation.py --epochs 15 --teacher-epochs 30 --pretrain-steps 3000 --resume
    python benchmarks/cifar10_distillation.py --epochs 15 --teacher-epochs 30 --pretrain-steps 3000 --rows KD DKD
    # a smoke test (seconds per row)
    python benchmarks/cifar10_distillation.py --train-images 200 --test-images 100 --epochs 1 --teacher-epochs 1 \\
        --pretrain-steps 2 --batch-size 16 --num-workers 0 --out /tmp/distill_smoke.json --work-dir /tmp/distill_smoke
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError

from ssl_lightning.cli import SSLCLI
from ssl_lightning.components.rotation import NUM_ROTATIONS
from ssl_lightning.methods import LSSKD, SLA
from ssl_lightning.methods.supervised.base import ECE_BINS, SupervisedMethod

from cifar10_knn import stratified_subset  # beside this script
from cifar10_supervised import EpochClock, machine
from recipes import CONFIGS
from report import emit

ROOT = Path(__file__).resolve().parents[1]
TEACHER_RESNET = '{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}'  # cifar10_supervised.py's backbone
STUDENT_RESNET = '{"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}'  # half as wide: a quarter of the FLOPs
LABEL_FRACTION = 0.1
SEED = 0
#: DKD's warm-up of its loss weight: 20 of mdistiller's 240 epochs, the same share of this budget
DKD_WARMUP_SHARE = 20 / 240


@dataclass(frozen=True)
class Row:
    name: str
    recipe: Path
    needs: str | None = None  # the row whose checkpoint this one reads
    tested: bool = True


ROWS = [
    Row("teacher", CONFIGS / "cifar10" / "classifier.yaml"),
    Row("baseline", CONFIGS / "cifar10" / "classifier.yaml"),
    Row("KD", CONFIGS / "cifar10" / "kd.yaml", needs="teacher"),
    Row("DKD", CONFIGS / "cifar10" / "dkd.yaml", needs="teacher"),
    Row("NKD", CONFIGS / "cifar10" / "nkd.yaml", needs="teacher"),
    Row("PSKD", CONFIGS / "cifar100" / "pskd.yaml"),
    Row("USKD", CONFIGS / "cifar100" / "uskd.yaml"),
    Row("SLA", CONFIGS / "cifar100" / "sla.yaml"),
    Row("LSSKD", CONFIGS / "cifar100" / "lsskd.yaml"),
    Row("classifier_10pct", CONFIGS / "cifar10" / "classifier.yaml"),
    Row("simclrv2_pretrain", CONFIGS / "cifar10" / "simclrv2_pretrain.yaml", tested=False),
    Row("simclrv2_finetune", CONFIGS / "cifar10" / "simclrv2_finetune.yaml", needs="simclrv2_pretrain"),
    Row("simclrv2_distill", CONFIGS / "cifar10" / "simclrv2_distill.yaml", needs="simclrv2_finetune"),
]
ROW_NAMES = [row.name for row in ROWS]
LABELLED_ROWS = ("classifier_10pct", "simclrv2_finetune")  # trained on the 10% alone: the batch must fit it

#: What the CIFAR-100 recipes set that this benchmark changes, and why (the rest transfers: the class count,
#: and so SLA's and LSSKD's 4 x 10 joint labels and USKD's 9 non-target classes, links from the data).
#:   all four: the batch (PS-KD, USKD, SLA 128, LSSKD 64) becomes --batch-size, shared by every student row;
#:   PSKD: drop_last false is the method's (every image needs last epoch's prediction): kept, passed explicitly;
#:   USKD: its weights alpha = beta = mu = 0.1 are the official CIFAR-100 ones; no CIFAR-10 setting is
#:   published, so they stay; aux_stage -2 is the student's third stage (64 channels).
#:   SLA keeps its weight decay 1e-4 (the official code's) and LSSKD / SLA their non-Nesterov SGD: the recipe's.
CIFAR100_RECIPES = {"PSKD": ["--data.drop_last", "false"]}


def common_arguments(row: Row, data: Path, args: argparse.Namespace) -> list[str]:
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    return [
        "--config", str(row.recipe), "--seed_everything", str(SEED),
        # The recipe's data settings that NpzArrays takes (views, drop_last, label_fraction...) carry over.
        "--data", "NpzArrays", "--data.path", str(data), "--data.batch_size", str(args.batch_size),
        "--data.num_workers", str(args.num_workers), "--data.pin_memory", str(accelerator == "gpu").lower(),
        "--trainer.accelerator", accelerator, "--trainer.precision", args.precision,
        "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_checkpointing", "false", "--trainer.logger", "false", "--trainer.callbacks", "[]",
        # The run directory (results files, labelled_subset.json): <work-dir>/<row>; a recipe's run_name moves too.
        "--root", str(args.work_dir), "--run_name", row.name,
    ]


def row_arguments(row: Row, args: argparse.Namespace) -> list[str]:
    """The CLI arguments that make ``row`` what it is, beyond ``common_arguments``."""
    student = ["--model.init_args.backbone_kwargs", args.student_backbone_kwargs]
    epochs = ["--trainer.max_epochs", str(args.epochs)]
    labelled = ["--data.label_fraction", str(LABEL_FRACTION), "--data.label_fraction_seed", str(SEED),
                "--data.unlabelled", "drop"]
    teacher = ["--model.init_args.teacher_ckpt", str(checkpoint(args.work_dir, "teacher"))]
    name = row.name
    if name == "teacher":
        return ["--model.init_args.backbone_kwargs", args.teacher_backbone_kwargs,
                "--trainer.max_epochs", str(args.teacher_epochs)]
    if name == "baseline":
        return student + epochs
    if name in ("KD", "NKD"):
        return student + epochs + teacher
    if name == "DKD":
        return student + epochs + teacher + ["--model.init_args.dkd_warmup_epochs", f"{args.epochs * DKD_WARMUP_SHARE:g}"]
    if name in ("PSKD", "USKD", "SLA", "LSSKD"):
        return student + epochs + CIFAR100_RECIPES.get(name, [])
    if name == "classifier_10pct":
        return student + ["--trainer.max_epochs", str(args.labelled_epochs)] + labelled
    if name == "simclrv2_pretrain":
        # The recipe's projector is as wide as ResNet-18's 512 features (SimCLRv2's rule); here as wide as the
        # student's. Its 10 warm-up epochs of 1,000 become a tenth of the steps (cifar10_knn.py's rule for short
        # budgets). label_fraction: the online probe (detached, so the backbone never sees a label) gets the
        # pipeline's 10% of the labels, not all of them.
        return student + [
            "--model.init_args.proj_hidden_dim", str(feature_width(args.student_backbone_kwargs)),
            "--model.init_args.warmup_steps", str(max(1, args.pretrain_steps // 10)),
            "--trainer.max_steps", str(args.pretrain_steps), "--trainer.max_epochs", "-1",
            "--data.label_fraction", str(LABEL_FRACTION), "--data.label_fraction_seed", str(SEED),
        ]
    if name == "simclrv2_finetune":  # the backbone comes from the checkpoint
        return ["--model.init_args.pretrained", str(checkpoint(args.work_dir, "simclrv2_pretrain")),
                "--trainer.max_epochs", str(args.labelled_epochs)] + labelled
    if name == "simclrv2_distill":  # the recipe's label_fraction 0.1 stays: ce_weight 0 uses no label
        return student + epochs + ["--model.init_args.teacher_ckpt", str(checkpoint(args.work_dir, "simclrv2_finetune"))]
    raise ValueError(f"unknown row {name!r}; rows: {', '.join(ROW_NAMES)}")


def feature_width(backbone_kwargs: str) -> int:
    """Pooled feature width of timm's resnet18 built with these kwargs (basic blocks: the last stage's channels)."""
    return int(json.loads(backbone_kwargs).get("channels", [64, 128, 256, 512])[-1])


def checkpoint(work_dir: Path, row: str) -> Path:
    return work_dir / row / "final.ckpt"


class ImageCount(L.Callback):
    """Training images the fit took (dataset images, not the views or rotations made of them)."""

    def __init__(self) -> None:
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images += len(batch["label"])


class HeldOutScores(L.LightningModule):
    """Top-1 / top-5 / ECE of a module's logits on the test images, with ``SupervisedMethod``'s metrics (the same
    15 bins): ``FineTune`` has no test step (it validates ``val/finetune_top1`` and logs no ECE)."""

    def __init__(self, model: torch.nn.Module, num_classes: int) -> None:
        super().__init__()
        self.model = model
        self.top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro", ignore_index=-1)
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro", ignore_index=-1)
        self.ece = MulticlassCalibrationError(num_classes, n_bins=ECE_BINS, norm="l1", ignore_index=-1)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits, labels = self.model(batch["views"][0]).float(), batch["label"]
        for name in ("top1", "top5", "ece"):
            metric = getattr(self, name)
            metric(logits, labels)
            self.log(f"test/{name}", metric)


def scores(tested: dict) -> dict:
    return {f"test_{name}": round(100 * tested[f"test/{name}"], 2) for name in ("top1", "top5", "ece")}


def run_row(row: Row, data: Path, args: argparse.Namespace) -> dict:
    extra = row_arguments(row, args)
    cli = SSLCLI(args=common_arguments(row, data, args) + extra, run=False)
    model, datamodule, trainer = cli.model, cli.datamodule, cli.trainer
    clock, count = EpochClock(), ImageCount()
    trainer.callbacks.extend([clock, count])
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    fit_seconds = time.perf_counter() - start
    trainer.save_checkpoint(checkpoint(args.work_dir, row.name))
    passes = datamodule.num_views * (NUM_ROTATIONS if isinstance(model, (SLA, LSSKD)) else 1)
    result = {
        "recipe": str(row.recipe.relative_to(ROOT)),
        "method": type(model).__name__,
        "needs": row.needs,
        "arguments": extra,
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "train_images": len(datamodule.plain_dataloader("train").dataset),
        "images_trained_on": datamodule.num_train_images,  # the 10% rows: the labelled images alone
        "fit_seconds": round(fit_seconds, 1),
        "seconds_per_epoch": [round(s, 1) for s in clock.seconds],
        "train_images_per_second": round(count.images / fit_seconds, 1),
        "backbone_passes_per_image": passes,  # views x rotations; a KD teacher's forward is not counted
        "backbone_images_per_second": round(count.images * passes / fit_seconds, 1),
    }
    if row.tested:
        start = time.perf_counter()
        if isinstance(model, SupervisedMethod):
            tested = trainer.test(model, datamodule, verbose=False)[0]
        else:  # FineTune
            tested = trainer.test(HeldOutScores(model, datamodule.num_classes), datamodule, verbose=False)[0]
        result.update(scores(tested), test_seconds=round(time.perf_counter() - start, 1),
                      test_images=len(datamodule.test_dataloader().dataset))
        if isinstance(model, SLA):
            result["sla_heads"] = sla_heads(model, datamodule, trainer, result)
    result["hparams"] = json.loads(json.dumps(dict(model.hparams), default=str))
    result["machine"] = machine()
    return result


def sla_heads(model: SLA, datamodule, trainer: L.Trainer, trained: dict) -> dict:
    """SLA's ``test`` logs the head of its ``inference`` mode alone: the row's is SLA+SD (the single-label head);
    SI (the joint head at rotation 0, one pass) and AG (the joint head over the 4 rotations, four passes) are
    scored by testing again with ``inference`` switched."""
    heads = {"SD (single-label head, the row's)": {key: trained[key] for key in ("test_top1", "test_top5", "test_ece")}}
    for label, mode in (("SI (joint head, rotation 0)", "single"), ("AG (joint head, 4 rotations)", "aggregated")):
        model.hparams.inference = mode
        heads[label] = scores(trainer.test(model, datamodule, verbose=False)[0])
    model.hparams.inference = "distilled"
    return heads


def settings(args: argparse.Namespace, data: Path) -> dict:
    """What makes rows comparable: a file measured with other settings is not continued."""
    return {
        "data": str(args.data), "train_images": args.train_images, "test_images": args.test_images,
        "subset_file": str(data), "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
        "labelled_epochs": args.labelled_epochs, "pretrain_steps": args.pretrain_steps,
        "batch_size": args.batch_size, "precision": args.precision, "seed": SEED,
        "teacher_backbone_kwargs": json.loads(args.teacher_backbone_kwargs),
        "student_backbone_kwargs": json.loads(args.student_backbone_kwargs),
        "label_fraction": LABEL_FRACTION, "dkd_warmup_epochs": args.epochs * DKD_WARMUP_SHARE,
    }


def rows_to_run(selected: list[str], done: set[str], resume: bool) -> list[str]:
    """The selected rows in table order; with ``resume`` those already measured are skipped, unless the row
    whose checkpoint they read runs again (their figures would belong to an older producer)."""
    runs: list[str] = []
    for row in ROWS:
        if row.name in selected and (not resume or row.name not in done or row.needs in runs):
            runs.append(row.name)
    return runs


def missing_inputs(runs: list[str], work_dir: Path) -> list[str]:
    """Rows to run whose producer neither runs now nor left its checkpoint in the work directory."""
    needs = {row.name: row.needs for row in ROWS}
    return [f"{name} needs {checkpoint(work_dir, needs[name])} (run the row {needs[name]})"
            for name in runs if needs[name] and needs[name] not in runs and not checkpoint(work_dir, needs[name]).exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10_jpeg.npz")
    parser.add_argument("--train-images", type=int, default=None, help="class-stratified training subset")
    parser.add_argument("--test-images", type=int, default=None, help="class-stratified test subset")
    parser.add_argument("--epochs", type=int, default=15, help="every student row's epochs")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--labelled-epochs", type=int, default=None,
                        help="epochs of classifier_10pct and simclrv2_finetune over the 10%% (default: --epochs)")
    parser.add_argument("--pretrain-steps", type=int, default=3000, help="SimCLR optimizer steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--teacher-backbone-kwargs", default=TEACHER_RESNET, help="JSON builder arguments, timm resnet18")
    parser.add_argument("--student-backbone-kwargs", default=STUDENT_RESNET, help="JSON builder arguments, timm resnet18")
    parser.add_argument("--rows", nargs="+", choices=ROW_NAMES, default=ROW_NAMES, help="run these rows only")
    parser.add_argument("--resume", action="store_true", help="skip the rows already in --out")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_distillation.json")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / "results" / "cifar10_distillation_work",
                        help="run directories and checkpoints (KD's teacher, the pipeline's stages)")
    args = parser.parse_args()
    args.labelled_epochs = args.epochs if args.labelled_epochs is None else args.labelled_epochs
    args.work_dir = args.work_dir.resolve()
    if not args.data.exists():
        parser.error(f"{args.data} not found: see ../shared/data/README.md for the CIFAR-10 JPEG copy")
    for flag in ("teacher_backbone_kwargs", "student_backbone_kwargs"):
        try:
            json.loads(getattr(args, flag))
        except json.JSONDecodeError as error:
            parser.error(f"--{flag.replace('_', '-')} is not JSON ({error}): e.g. {STUDENT_RESNET!r}")
    labelled = round(LABEL_FRACTION * (args.train_images or 50_000))
    if any(name in LABELLED_ROWS for name in args.rows) and args.batch_size > labelled:
        parser.error(f"--batch-size {args.batch_size} is larger than the {labelled} labelled images that "
                     f"{' and '.join(LABELLED_ROWS)} train on: raise --train-images or lower --batch-size")
    data = stratified_subset(args.data, args.train_images, args.test_images)

    wanted = settings(args, data)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    if report and report.get("settings") != wanted:
        parser.error(f"{args.out} was measured with other settings ({report.get('settings')}); these rows would not "
                     "compare with its rows: give another --out, or the same settings")
    done = report.get("rows", {})
    runs = rows_to_run(args.rows, set(done), args.resume)
    missing = missing_inputs(runs, args.work_dir)
    if missing:
        parser.error("; ".join(missing))
    skipped = [name for name in args.rows if name not in runs]
    print(f"rows to run: {', '.join(runs) or 'none'}" + (f"; already in {args.out}: {', '.join(skipped)}" if skipped else ""))
    report = {
        "protocol": "issue 16's distillation evidence on CIFAR-10 (JPEG copy): each row its recipe through the CLI "
                    "with the settings below, no validation during the fit, then `test` on the un-augmented test "
                    "images: top-1 / top-5 and ECE (15 equal-width bins) in percent; fit_seconds = wall time of "
                    "`fit`. See benchmarks/cifar10_distillation.py's docstring for what each row is.",
        "settings": wanted,
        "rows": done,
    }
    for name in runs:
        row = next(row for row in ROWS if row.name == name)
        measured = run_row(row, data, args)
        merged = {**report["rows"], name: measured}
        report["rows"] = {key: merged[key] for key in ROW_NAMES if key in merged}  # table order
        emit(report, args.out)
    if not runs:
        emit(report, args.out)


if __name__ == "__main__":
    main()
