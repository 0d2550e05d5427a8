"""Does self-distillation help further pre-training? Lee et al. (ICLR 2023)'s comparison, at a small scale.

Four stages, each from the previous one's checkpoint:

1. initial: MAE pre-trained on a source dataset (MNIST, ``../shared/data/mnist.npz``, resized to 32 px), for
   ``--initial-steps`` steps (AdamW, LR 1.5e-3 per 256 images, weight decay 0.05, 10 % warm-up, cosine; MAE's
   random resized crop and flip). Or ``--initial-ckpt``: an MAE checkpoint of this architecture to start from.
2. further pre-trained: MAE continued from (1)'s encoder and decoder (``init_ckpt``) on the target data,
   scikit-learn's digits (1,437 training images, upsampled to 32 px), for ``--steps`` steps.
3. self-distilled: ``SelfDistilledMAE`` from the same initial checkpoint on the target data, its frozen teacher
   (2), for ``--steps`` steps.
   (2) and (3) take the method settings of their recipes, ``configs/cifar10/mae_further_pretrain.yaml`` and
   ``mae_self_distill.yaml`` (the official code's: AdamW LR 1.5e-4 unscaled, weight decay 0.01, no warm-up,
   mask ratio 0.75, normalised pixels, no augmentation, distillation weight 1), with this script's small ViT
   and decoder instead of ViT-B/16; their online probe pools the masked pass (it is not reported).
4. FineTune of each of (1), (2), (3) on the digits' labels, the same budget and seed for all three
   (``--finetune-epochs``; AdamW, LR 5e-4 per 256, weight decay 0.05, layer decay 0.65, label smoothing 0.1,
   a tenth of the epochs, at most 5, of warm-up; a random resized crop of scale 0.5-1 without flip: digits
   are mirror-sensitive). Reported: top-1 on the 360 held-out digits after the last epoch, in percent.

The paper's claim to compare with: further pre-training alone overfits a small target set, and
self-distillation fine-tunes better than both the initial and the further pre-trained model. A tiny budget
only shows that the pipeline runs; the figures need hundreds of steps per stage.

    python benchmarks/further_pretraining.py --initial-steps 2000 --steps 1000 --finetune-epochs 30
    # does it run? (two to five minutes on two shared CPU cores)
    python benchmarks/further_pretraining.py --initial-steps 4 --steps 4 --finetune-epochs 1 --batch-size 32 --out /tmp/fp.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from ssl_lightning.datamodules import Digits, NpzArrays, ViewSpec
from ssl_lightning.evaluation import FineTune
from ssl_lightning.methods import METHODS

from report import emit

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"further": ROOT / "configs" / "cifar10" / "mae_further_pretrain.yaml",
           "self_distilled": ROOT / "configs" / "cifar10" / "mae_self_distill.yaml"}
#: what the recipes set for CIFAR-10 at 224 px that this small run replaces
RECIPE_KEYS_REPLACED = ("backbone", "backbone_kwargs", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                        "init_weights", "init_ckpt", "teacher_ckpt", "probe_features")
SMALL_VIT = '{"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3}'
SMALL_DECODER = {"decoder_embed_dim": 64, "decoder_depth": 2, "decoder_num_heads": 4}
#: MAE's pre-training view (configs/cifar10/mae.yaml): a random resized crop (scale 0.2-1) and a flip, no colour
MAE_VIEW = [ViewSpec(crop_scale=(0.2, 1.0), jitter_p=0.0, grayscale_p=0.0)]
NO_AUGMENTATION = [ViewSpec(crop_scale=None)]
FINETUNE_VIEW = [ViewSpec(crop_scale=(0.5, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0)]


def machine() -> dict:
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__, "lightning": L.__version__}


def trainer(folder: Path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     default_root_dir=str(folder), **kwargs)


def recipe_settings(stage: str) -> dict:
    """The method arguments of the stage's CIFAR-10 recipe, less what this small run sets itself."""
    init_args = yaml.safe_load(RECIPES[stage].read_text())["model"]["init_args"]
    return {key: value for key, value in init_args.items() if key not in RECIPE_KEYS_REPLACED}


def pretrain(name: str, settings: dict, datamodule, steps: int, checkpoint: Path, seed: int) -> dict:
    L.seed_everything(seed)
    model = METHODS[name](**settings)
    fit = trainer(checkpoint.parent, max_steps=steps, limit_val_batches=0)
    start = time.perf_counter()
    fit.fit(model, datamodule)
    seconds = time.perf_counter() - start
    fit.save_checkpoint(checkpoint)
    return {"method": name, "steps": steps, "seconds": round(seconds, 1),
            "final_train_loss": round(float(fit.callback_metrics["train/loss"]), 4), "checkpoint": str(checkpoint)}


def finetune(checkpoint: Path, epochs: int, batch_size: int, seed: int, folder: Path) -> dict:
    L.seed_everything(seed)
    model = FineTune(pretrained=str(checkpoint), layer_decay=0.65, warmup_epochs=min(5.0, epochs / 10))
    fit = trainer(folder, max_epochs=epochs)
    start = time.perf_counter()
    fit.fit(model, Digits(batch_size=batch_size, num_workers=0, views=FINETUNE_VIEW, seed=seed))
    return {"top1": round(100 * float(fit.callback_metrics["val/finetune_top1"]), 2),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "mnist.npz",
                        help="the initial MAE's data: an .npz NpzArrays reads (resized to 32 px)")
    parser.add_argument("--initial-ckpt", type=Path, default=None,
                        help="start from this MAE checkpoint (of --backbone-kwargs' ViT) instead of stage 1")
    parser.add_argument("--initial-steps", type=int, default=2000, help="stage 1's optimizer steps")
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of stages 2 and 3 each")
    parser.add_argument("--finetune-epochs", type=int, default=30, help="epochs of each fine-tuning")
    parser.add_argument("--batch-size", type=int, default=64, help="of every stage (the official code's 64)")
    parser.add_argument("--backbone-kwargs", default=SMALL_VIT, help="JSON builder arguments of timm's ViT-Tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "further_pretraining.json")
    args = parser.parse_args()
    if args.initial_ckpt is None and not args.source.exists():
        parser.error(f"{args.source} not found: see ../shared/data/README.md (MNIST), or pass --initial-ckpt")
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.workdir or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        run(args, folder)


def run(args: argparse.Namespace, folder: Path) -> None:
    architecture = {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": json.loads(args.backbone_kwargs),
                    **SMALL_DECODER}
    target = Digits(batch_size=args.batch_size, num_workers=0, views=NO_AUGMENTATION, seed=args.seed)
    source = "--initial-ckpt" if args.initial_ckpt is not None else f"{args.source.name} resized to 32 px"
    results = {
        "protocol": f"initial MAE ({source}) -> further pre-training (MAE from init_ckpt) and self-distillation "
                    f"(SelfDistilledMAE from init_ckpt, teacher = the further pre-trained MAE) on scikit-learn's digits, "
                    f"with the method settings of configs/cifar10/mae_further_pretrain.yaml and mae_self_distill.yaml "
                    f"-> FineTune of each with the same budget and seed (layer decay 0.65); top-1 on the 360 held-out "
                    f"digits after the last epoch, percent (see the script's docstring)",
        "machine": machine(),
        "budget": {"initial_steps": args.initial_steps, "steps": args.steps, "finetune_epochs": args.finetune_epochs,
                   "batch_size": args.batch_size, "seed": args.seed},
        "architecture": architecture,
        "stages": {},
        "finetune_top1": {},
    }
    initial = args.initial_ckpt
    if initial is None:
        initial = folder / "initial.ckpt"
        source = NpzArrays(path=str(args.source), image_size=32, batch_size=args.batch_size, num_workers=0,
                           views=MAE_VIEW, seed=args.seed)
        settings = {**architecture, "optimizer": "adamw", "lr": 1.5e-3, "weight_decay": 0.05,
                    "warmup_steps": max(1, args.initial_steps // 10), "probe_features": "visible"}
        results["stages"]["initial"] = {"data": f"{args.source.name}, resized to 32 px",
                                        **pretrain("MAE", settings, source, args.initial_steps, initial, args.seed)}
    further = folder / "further.ckpt"
    settings = {**recipe_settings("further"), **architecture, "init_ckpt": str(initial), "probe_features": "visible"}
    results["stages"]["further"] = pretrain("MAE", settings, target, args.steps, further, args.seed)
    distilled = folder / "self_distilled.ckpt"
    settings = {**recipe_settings("self_distilled"), **architecture, "init_ckpt": str(initial),
                "teacher_ckpt": str(further), "probe_features": "visible"}
    results["stages"]["self_distilled"] = pretrain("SelfDistilledMAE", settings, target, args.steps, distilled,
                                                   args.seed)
    for name, checkpoint in (("initial", initial), ("further_pretrained", further), ("self_distilled", distilled)):
        tuned = finetune(checkpoint, args.finetune_epochs, args.batch_size, args.seed, folder / f"finetune_{name}")
        results["finetune_top1"][name] = tuned["top1"]
        results["stages"].setdefault(f"finetune_{name}", {}).update(tuned)
        emit(results, args.out)  # after each fine-tuning, so a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
