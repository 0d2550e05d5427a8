"""Do the self-supervised methods learn at all? Every one of them, on the quickstart's protocol, on a CPU.

A sanity check that runs in minutes where ``cifar10_knn.py`` needs a GPU: each method trains on
scikit-learn's digits (1,437 training scans upsampled to 32x32) for the quickstart's budget, with
the quickstart's views, backbone and optimizer (``configs/quickstart.yaml``: small ResNet with a
CIFAR stem, AdamW 2e-3 without LR scaling, weight decay 1e-4, 1 warm-up epoch, batch 128, 17
epochs = 187 steps), and each method's own loss and temperatures with the head widths of its CIFAR-10
recipe (``configs/cifar10/``: ImageNet-sized heads such as VICReg's 8192-wide expander would
dominate the time). Queues and per-image memories are sized for 1,437 images (queue 1,024).

Reported per method: kNN top-1 (k=20, T=0.1, cosine, backbone features in eval mode; bank = the
training split, queries = the 360 held-out digits) of the trained backbone, of the same backbone at
random initialisation (seed 0) and of raw pixels, and the wall time.

This is not the issue's CIFAR-10 evidence (cifar10_knn.py): digits are easy (raw pixels reach 97%),
so it shows that a method trains and moves its features away from random, not how well it ranks.

    python benchmarks/digits_knn.py --out benchmarks/results/digits_knn.json
    python benchmarks/digits_knn.py --methods MoCoV2 NNCLR
    python benchmarks/digits_knn.py --methods VICReg --implementation both   # and lightly's (pip install lightly)
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import lightning as L
import torch
import yaml

from ssl_lightning.callbacks import KNNReport
from ssl_lightning.datamodules import Digits
from ssl_lightning.datamodules.views import ViewSpec
from ssl_lightning.methods import FAMILIES

from recipes import recipe
from report import emit

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
#: sized for digits' 1,437 training images and batch 128
SMALL_DATA_OVERRIDES = {"queue_size": 1024, "num_hardest": 256, "num_mixed": 256, "num_query_mixed": 64}


def quickstart() -> tuple[dict, dict, dict]:
    config = yaml.safe_load(QUICKSTART.read_text())
    model = config["model"]["init_args"]
    shared = {key: model[key] for key in ("backbone", "backbone_kwargs", "cifar_stem", "optimizer", "lr",
                                          "weight_decay", "lr_scaling", "warmup_epochs", "probe_lr", "channels_last")}
    data = dict(config["data"]["init_args"])
    data["views"] = [ViewSpec(**spec) for spec in data["views"]]
    return shared, data, config["trainer"]


def cifar_head_widths(method: str) -> dict:
    """The head sizes (``*_dim``, ``num_prototypes``) of the method's CIFAR-10 recipe."""
    init_args = yaml.safe_load(recipe(method).read_text())["model"].get("init_args", {})
    return {key: value for key, value in init_args.items() if key.endswith("_dim") or key == "num_prototypes"}


def run_method(name: str, seed: int, implementation: str = "ours") -> dict:
    cls = FAMILIES["ssl"][name]
    accepted = inspect.signature(cls.__init__).parameters  # ours: the adapters take the same arguments
    if implementation == "lightly":
        from lightly_counterparts import LIGHTLY_COUNTERPARTS  # beside this script; needs `pip install lightly`

        cls = LIGHTLY_COUNTERPARTS[name]
    shared, data, trainer_config = quickstart()
    overrides = {key: value for key, value in cifar_head_widths(name).items() if key in accepted}
    overrides |= {key: value for key, value in SMALL_DATA_OVERRIDES.items() if key in accepted}
    L.seed_everything(seed)
    model = cls(**shared, **overrides)
    report = KNNReport(k=20, temperature=0.1, init_seed=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=trainer_config["max_epochs"], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[report])
    start = time.perf_counter()
    trainer.fit(model, Digits(**data))
    return {"method": name, "implementation": implementation, "overrides": overrides, "knn_top1": report.results,
            "wall_seconds": round(time.perf_counter() - start, 1)}


def has_lightly_counterpart(method: str) -> bool:
    from lightly_counterparts import LIGHTLY_COUNTERPARTS

    return method in LIGHTLY_COUNTERPARTS


def main() -> None:
    methods = list(FAMILIES["ssl"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=methods, default=methods)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--implementation", choices=["ours", "lightly", "both"], default="ours",
                        help="lightly's heads and loss in our method (lightly_counterparts.py); both: ours, then lightly's")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "digits_knn.json")
    args = parser.parse_args()
    results = {
        "protocol": "configs/quickstart.yaml's budget, views, backbone and optimizer for every method; kNN k=20 "
                    "T=0.1 cosine on backbone feats (eval mode), bank = 1,437 training digits, queries = 360 held out",
        "machine": {"device": "cpu", "cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
        "runs": [],
    }
    implementations = ["ours", "lightly"] if args.implementation == "both" else [args.implementation]
    for method in args.methods:
        for implementation in implementations:
            if implementation == "lightly" and not has_lightly_counterpart(method):
                continue
            results["runs"].append(run_method(method, args.seed, implementation))
            emit(results, args.out)  # after each method, so a cut-short run keeps what it measured


if __name__ == "__main__":
    main()
