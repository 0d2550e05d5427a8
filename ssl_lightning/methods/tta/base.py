"""``TTAMethod``: the base of test-time adaptation methods. A trained classifier (the source model)
meets a stream of test batches; for each batch it predicts, then adapts, inside Lightning's ``test``.

The protocol and the defaults follow the mariodoebler/test-time-adaptation benchmark
(``classification/methods/base.py``); docs/tta.md describes the family.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ssl_lightning.components.classifier_files import ClassifierSource, LoadedClassifier
from ssl_lightning.datamodules.base import ViewDataModule
from ssl_lightning.evaluation.results import write_result
from ssl_lightning.methods.tta.report import DomainErrors, mean_error, write_error_table

#: the row name of a test set that is not a ``CorruptionStream`` (one domain, no resets)
PLAIN_TEST_SET = "test"


class TTAMethod(L.LightningModule):
    """Base class of test-time adaptation: a source classifier, adapted on the test stream.

    Run with ``trainer.test(method, datamodule=CorruptionStream(...))`` and
    ``Trainer(inference_mode=False)`` (the CLI's ``test`` sets it for these methods): Lightning's
    default inference mode forbids the gradients adaptation takes. Each ``test_step``:

    1. restores the source state when the batch starts a domain under ``reset_each_shift`` (its
       ``reset`` flag) or, with ``episodic``, before every batch;
    2. calls :meth:`forward_and_adapt` on the images, which returns the logits the prediction is made
       from, computed *before* this batch's update (predict first, then adapt), and adapts;
    3. counts the errors per domain (``domain`` of the batch; a test set without it is one domain).

    At the end it logs ``test/error`` (the mean over domains, percent) and ``test/error/<domain>``,
    prints the per-domain table, writes it as ``tta_errors.csv`` and ``tta_errors.md`` into the run
    directory (``trainer.default_root_dir``), adds the mean to ``results.md`` and, with a W&B logger,
    logs it as the table ``tta/errors``. A stream without labels still adapts; its table says that no
    error can be computed. ``seconds_per_10k_images`` (test loop wall time) is printed with it.

    The source model is ``self.model`` (images -> logits), from exactly one source: ``source_ckpt`` (a
    checkpoint of a supervised method: ``Classifier`` or a distilled student, or an exported backbone
    ``.safetensors`` with ``source_head``), ``source_timm`` with ``source_weights``, or ``source``, a
    module given in Python. A checkpoint without a classifier head (a self-supervised method's) is
    refused, and so is a model whose class count or input channels differ from the data's.

    A subclass implements :meth:`configure_adaptation` (what may change, on ``self.model`` and any
    module of its own, such as a teacher) and :meth:`forward_and_adapt`; it takes gradient steps with
    :meth:`adapt_step`. The state of every module (``state_dict()``, which includes a teacher's) and of
    the optimizer right after ``configure_adaptation`` is the *source state* that :meth:`reset`
    restores bit for bit; a subclass with other state (Python numbers, running estimates) restores it
    in :meth:`on_reset`.

    Several processes (DDP) split each batch of the stream (``CorruptionStream``) and adapt one shared
    model: :meth:`adapt_step` averages the gradients over processes, weighted by their images, so the
    step equals one process's on the whole batch for a loss that is a mean over images. BatchNorm's
    test-batch statistics stay per process (as in DDP training without SyncBatchNorm), so a model with
    BatchNorm adapts as with a batch of ``batch_size`` images per process (docs/tta.md).

    The optimizer (``optimizer``, ``lr``, ``beta``, ``momentum``, ``nesterov``, ``weight_decay``) is the
    benchmark's: Adam with betas (``beta``, 0.999), or SGD with momentum, no dampening and Nesterov.

    Args:
        source_ckpt, source_head, source_timm, source_weights, source_timm_kwargs: the source model's
            files (above).
        source: the source model as an ``nn.Module`` (images -> logits), in Python; not saved in the
            hyperparameters.
        optimizer, lr, beta, momentum, nesterov, weight_decay: the adaptation optimizer.
        episodic: restore the source state before every batch (the benchmark's ``MODEL.EPISODIC``).
        num_classes, in_chans, image_size, batch_size: the data's, linked by the CLI; the source model
            is checked against the first two.
    """

    def __init__(
        self,
        source_ckpt: str | None = None,
        source_head: str | None = None,
        source_timm: str | None = None,
        source_weights: str | None = None,
        source_timm_kwargs: dict[str, Any] | None = None,
        source: nn.Module | None = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 1e-3,
        beta: float = 0.9,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        episodic: bool = False,
        num_classes: int | None = None,
        in_chans: int | None = None,
        image_size: int | None = None,
        batch_size: int | None = None,
    ):
        super().__init__()
        name = type(self).__name__
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"{name}: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"{name}: lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        self.save_hyperparameters(ignore=["source"])
        self.source = ClassifierSource(name, "source", source_ckpt, source_head, source_timm, source_weights,
                                       dict(source_timm_kwargs or {}), type(source).__name__ if source else None)
        self.model: nn.Module | None = source
        self.adapted: list[nn.Parameter] = []
        self.tta_optimizer: torch.optim.Optimizer | None = None
        self._source_state: dict[str, Tensor] | None = None
        self._source_optimizer_state: dict | None = None
        self.domain_errors: DomainErrors | None = None
        self.domain_names: list[str] = [PLAIN_TEST_SET]
        self._started = 0.0

    # ----------------------------------------------------------------- what a method defines
    def configure_adaptation(self) -> list[nn.Parameter]:
        """Prepare ``self.model`` (and any module of the method) for adaptation and return the
        parameters the optimizer changes (none: no optimizer). Runs once, after the source is loaded."""
        raise NotImplementedError

    def forward_and_adapt(self, images: Tensor) -> Tensor:
        """The logits for ``images`` from the current state, then this batch's adaptation."""
        raise NotImplementedError

    def on_reset(self) -> None:
        """Restore state that is not in ``state_dict()`` or the optimizer (called by :meth:`reset`)."""

    # ----------------------------------------------------------------- building
    def setup(self, stage: str) -> None:
        if stage != "test":
            raise ValueError(self._adapts_in_test_only(stage))
        if self._source_state is not None:
            return  # a second trainer.test continues from the adapted state; reset() restores the source
        hp = self.hparams
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        num_classes = hp.num_classes or getattr(datamodule, "num_classes", None)
        in_chans = hp.in_chans or getattr(datamodule, "in_chans", None)
        if self.model is None:
            loaded = self.source.read(in_chans)
            self.model = loaded.model
        else:
            loaded = LoadedClassifier(self.model, _declared_classes(self.model), None)
        self.source.check_fits_data(loaded, num_classes, in_chans, datamodule)
        self.model.eval()
        self.adapted = list(self.configure_adaptation())
        names = getattr(datamodule, "domain_names", None)
        self.domain_names = list(names) if names else [PLAIN_TEST_SET]
        self.domain_errors = DomainErrors(len(self.domain_names))

    def _adapts_in_test_only(self, stage: str) -> str:
        return (f"{type(self).__name__} is a test-time adaptation method: it adapts inside `test` (python -m "
                "ssl_lightning test --config configs/tta/<recipe>.yaml, or trainer.test(method, datamodule=...)), not "
                f"in {stage!r}.")

    def training_step(self, batch: dict, batch_idx: int) -> None:
        # Defined so that Lightning's check of a fit passes on to setup("fit"), which says what to run instead.
        raise ValueError(self._adapts_in_test_only("fit"))

    def build_optimizer(self, parameters: list[nn.Parameter]) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=hp.lr, betas=(hp.beta, 0.999), weight_decay=hp.weight_decay)
        return torch.optim.SGD(parameters, lr=hp.lr, momentum=hp.momentum, dampening=0.0,
                               weight_decay=hp.weight_decay, nesterov=hp.nesterov and hp.momentum > 0)

    def configure_optimizers(self) -> None:
        return None  # adaptation has its own optimizer (``tta_optimizer``): Lightning builds none outside fit

    # ----------------------------------------------------------------- Lightning hooks
    def on_test_start(self) -> None:
        if self.adapted and torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} adapts with gradients, which Lightning's inference mode forbids: build the "
                "Trainer with inference_mode=False (in a config: trainer.inference_mode: false)."
            )
        if self._source_state is None:  # after the model moved to its device
            self.tta_optimizer = self.build_optimizer(self.adapted) if self.adapted else None
            self._source_state = _cloned(self.state_dict())
            optimizer = self.tta_optimizer
            self._source_optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer else None
        adapted = sum(parameter.numel() for parameter in self.adapted)
        total = sum(parameter.numel() for parameter in self.model.parameters())
        rank_zero_info(f"{type(self).__name__}: adapting {adapted:,} of the source model's {total:,} parameters "
                       f"on {len(self.domain_names)} domain(s).")
        self._started = time.perf_counter()

    def on_test_model_eval(self) -> None:
        self.eval()  # dropout off; BatchNorm after use_test_batch_statistics normalises with the batch in eval too

    def on_test_model_train(self) -> None:
        self.eval()  # the source model is not trained after test

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        images = batch["views"][0]
        if self.hparams.episodic or ("reset" in batch and bool(batch["reset"][0])):
            self.reset()
        with torch.enable_grad():
            logits = self.forward_and_adapt(images)
        logits = logits.detach()
        labels = batch.get("label", torch.full(images.shape[:1], -1, device=images.device, dtype=torch.long))
        domains = batch.get("domain", torch.zeros(images.shape[:1], device=images.device, dtype=torch.long))
        self.domain_errors.update(logits.argmax(dim=1), labels, domains)
        return {"logits": logits, "label": labels, "domain": domains}

    def on_test_epoch_end(self) -> None:
        counts = self.domain_errors.compute()  # summed over processes; torchmetrics squeezes one domain to 0-d
        counts = {key: value.reshape(-1) for key, value in counts.items()}
        self.domain_errors.reset()
        seconds = time.perf_counter() - self._started
        errors = counts["error"].tolist()
        mean = mean_error(errors)
        seen = int(counts["seen"].sum())
        self.log("test/error", mean, sync_dist=False, rank_zero_only=True)
        for name, error in zip(self.domain_names, errors):
            self.log(f"test/error/{name}", error, sync_dist=False, rank_zero_only=True)
        if not self.trainer.is_global_zero:
            return
        column = type(self).__name__
        note = None
        if not int(counts["labelled"].sum()):
            note = "The stream has no labels: no error can be computed (the method adapted on every batch)."
        speed = f"{seconds / max(seen, 1) * 1e4:.1f} s per 10,000 images ({seen:,} images in {seconds:.1f} s)"
        run = Path(self.trainer.default_root_dir)
        table = write_error_table(run, self.domain_names, {column: errors}, note=note)
        summary = {"method": column, "mean_error": mean, "images": seen, "seconds": round(seconds, 3),
                   "seconds_per_10k_images": round(seconds / max(seen, 1) * 1e4, 3)}
        (run / "tta_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        rank_zero_info(f"{column}: error (%) per domain\n{table}\n{column}: {speed}")
        if note is None:
            protocol = f"tta-{getattr(self.trainer.datamodule, 'protocol', 'test')}"
            write_result(self.trainer, protocol, "test/error", mean, None, self.hparams.source_ckpt, split="test")
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[name, error] for name, error in zip(self.domain_names, errors)] + [["mean", mean]]
                logger.log_table(key="tta/errors", columns=["domain", column], data=rows)

    # ----------------------------------------------------------------- adaptation helpers
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def adapt_step(self, loss: Tensor, images: int) -> None:
        """One optimizer step on ``loss`` (a mean over this process's ``images`` images): backward,
        gradients averaged over processes (weighted by images), step, zero."""
        loss.backward()
        self.average_gradients(images)
        self.tta_optimizer.step()
        self.tta_optimizer.zero_grad(set_to_none=True)

    def average_gradients(self, images: int) -> None:
        """Under several processes, each adapted parameter's gradient becomes the image-weighted mean of
        the processes' gradients (one all-reduce); a no-op in one process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.adapted]
        flat = torch.cat([grad.reshape(-1) * images for grad in grads] + [grads[0].new_tensor([images])])
        dist.all_reduce(flat)
        flat = flat[:-1] / flat[-1]
        for parameter, part in zip(self.adapted, torch.split(flat, [grad.numel() for grad in grads])):
            parameter.grad = part.view_as(parameter).to(parameter.dtype)

    def class_count(self) -> int:
        """The number of classes: ``num_classes``, else the DataModule's, else the source model's (its
        ``num_classes`` or its last linear layer's outputs). For the methods whose formulas hold it (EATA's
        and SAR's entropy margin ``margin_e0 * ln C``, ROID's class-probability average)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        model_classes = _declared_classes(self.model) if self.model is not None else None
        for found in (self.hparams.num_classes, getattr(datamodule, "num_classes", None), model_classes):
            if isinstance(found, int) and found >= 2:
                return found
        raise ValueError(
            f"{type(self).__name__} needs the number of classes, which neither the data nor the source model "
            f"({self.source.describe()}) gives: pass num_classes (>= 2), or test on a DataModule that knows it."
        )

    def features_and_classifier(self) -> tuple[Callable[[Tensor], Tensor], nn.Module]:
        """The source model in two parts, images -> features and the linear classifier (features ->
        logits), for methods that work on features (RMT's projector): our checkpoints' ``backbone`` and
        ``head``, or a timm model's ``forward_features`` + pre-logits pooling and ``get_classifier()``."""
        model = self.model
        parts = getattr(model, "backbone", None), getattr(model, "head", None)
        if all(isinstance(part, nn.Module) for part in parts):
            return parts
        if all(hasattr(model, name) for name in ("forward_features", "forward_head", "get_classifier")):
            return (lambda images: model.forward_head(model.forward_features(images), pre_logits=True)), \
                model.get_classifier()
        raise ValueError(
            f"{type(self).__name__} needs the source model's features, but {type(model).__name__} has neither "
            "`backbone` and `head` (our checkpoints) nor timm's forward_features/forward_head/get_classifier."
        )

    def source_batches(self, num_samples: int | None, batch_size: int, seed: int = 0) -> Iterator[dict]:
        """Batches of clean, labelled *training* images of the stream's source DataModule (a
        ``CorruptionStream``'s ``source``) through its plain view, on this module's device: a seeded
        random subset of ``num_samples`` images (None: all), in a seeded order. For the methods that
        use source data (EATA's Fisher information, RMT's warm-up and replay)."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        source = getattr(datamodule, "source", None)
        if not isinstance(source, ViewDataModule):
            raise ValueError(
                f"{type(self).__name__} reads training images of the source data, which a CorruptionStream provides "
                f"(its source DataModule's training split); the test data here is {type(datamodule).__name__}. Test "
                "on a CorruptionStream, or turn the option that needs source data off."
            )
        plain = source.plain_dataloader("train")
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(plain.dataset), generator=generator)
        chosen = order if num_samples is None else order[:num_samples]
        loader = DataLoader(Subset(plain.dataset, chosen.tolist()), batch_size=batch_size, shuffle=False,
                            collate_fn=plain.collate_fn, num_workers=0)
        for batch in loader:
            yield {key: value.to(self.device) if isinstance(value, Tensor) else
                   [view.to(self.device) for view in value] if key == "views" else value
                   for key, value in batch.items()}

    def reset(self) -> None:
        """Restore the source state: every module's state dict and the optimizer's, bit for bit."""
        if self._source_state is None:
            raise RuntimeError(f"{type(self).__name__}.reset(): nothing to restore before test starts")
        self.load_state_dict(self._source_state, strict=True)
        if self.tta_optimizer is not None:
            self.tta_optimizer.load_state_dict(copy.deepcopy(self._source_optimizer_state))
            self.tta_optimizer.zero_grad(set_to_none=True)
        self.on_reset()


def _cloned(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def _declared_classes(model: nn.Module) -> int | None:
    """The class count of a model given in Python: its ``num_classes`` (timm) or its last linear layer's."""
    declared = getattr(model, "num_classes", None)
    if isinstance(declared, int):
        return declared
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    return linears[-1].out_features if linears else None
