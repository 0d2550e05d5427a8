"""The base of distillation students: the teacher's arguments, read into a ``FrozenTeacher``, and the
teacher's logits of a batch, online or from a table computed once per fit."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.components.teacher_logits import (
    check_table_covers,
    compute_teacher_logits,
    look_up_teacher_logits,
)
from ssl_lightning.datamodules.base import ViewDataModule
from ssl_lightning.datamodules.views import views_are_deterministic
from ssl_lightning.methods.supervised.base import SupervisedMethod


class DistillationStudent(SupervisedMethod):
    """A supervised method taught by a frozen classifier (``self.teacher``, a
    :class:`~ssl_lightning.components.frozen_teacher.FrozenTeacher`; ``SupervisedMethod.setup("fit")``
    loads it and checks it against the data). One source: ``teacher_ckpt`` (or an exported backbone
    with ``teacher_head``), ``teacher_timm`` with ``teacher_weights``, or ``teacher`` in Python.

    ``teacher_optional``: a student that may train without any teacher (``GuidedSelfDistillation``'s
    round 0) gets ``self.teacher = None`` then; the others stop when ``fit`` finds no source.

    Students read the teacher through :meth:`teacher_logits` (batch -> logits of ``views[0]``). By
    default the teacher runs online, on the student's augmented view, every step. With
    ``precompute_teacher_logits`` it runs once per training image instead, at the start of ``fit``
    (``on_fit_start``: after ``setup`` loaded and checked it, on the training device): over the
    training set in index order, through the same view the student sees, in eval mode, without
    gradients and under the training step's precision (so the rows equal the online logits, in their
    dtype); each step then gathers its rows by ``batch["index"]``, with no host sync. Only for
    deterministic views (``datamodules.views.views_are_deterministic``: every view un-augmented, e.g.
    ``--data.views none``, per image on the CPU, no ``batch_styles``); random views stop the fit in
    ``setup``, as do a DataModule that is not a ``ViewDataModule`` (it cannot say) and FSDP (outside the
    training step the teacher's weights are sharded). Decisions:

    - Under DDP every rank computes the rows of its contiguous share of the training set (1 /
      world_size of the forward passes) and all-gathers them, so every rank holds the whole table:
      the sampler gives a rank any index. Memory: images x classes values of the teacher's dtype on
      every rank's device (CIFAR-100: 50,000 x 100 x 4 B = 20 MB; ImageNet in float32: 5.1 GB).
    - The table is a cache: not saved in checkpoints (it would add that size to every checkpoint and
      hold logits of a teacher or data that may have changed), recomputed at the start of every fit,
      resume included (one pass of the teacher over the training set, cheaper than one epoch of the
      student), freed at the end of fit. Every epoch checks that the training set still has the
      table's length (reloaded dataloaders).
    - It covers the whole training set even when ``limit_train_batches`` or ``max_steps`` stop the
      fit sooner.
    - Without a teacher (``GuidedSelfDistillation``'s round 0) there is nothing to compute and the
      option does nothing, so one set of arguments serves every round.

    Args:
        teacher_ckpt: a checkpoint of a supervised method (``Classifier``, a distilled student) or of
            ``FineTune``, or an exported backbone ``.safetensors`` (with ``teacher_head``).
        teacher_head: with an exported backbone: a file with the classifier head's weight and bias.
        teacher_timm: a timm model name, with ``teacher_weights`` (a local state dict file) and
            ``teacher_timm_kwargs`` (its builder arguments).
        teacher: a teacher ``nn.Module`` (images -> logits) in Python; not saved in the
            hyperparameters (pass it again to ``load_from_checkpoint`` to resume).
        save_teacher: keep the teacher's weights in the student's checkpoints.
        precompute_teacher_logits: compute the teacher's logits once per training image at the start of
            ``fit`` and look them up by ``index`` (deterministic views only, see above) instead of running the
            teacher on every batch.
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    teacher_optional = False
    python_only_arguments = ("teacher",)

    def __init__(
        self,
        teacher_ckpt: str | None = None,
        teacher_head: str | None = None,
        teacher_timm: str | None = None,
        teacher_weights: str | None = None,
        teacher_timm_kwargs: dict[str, Any] | None = None,
        teacher: nn.Module | None = None,
        save_teacher: bool = False,
        precompute_teacher_logits: bool = False,
        **kwargs: Any,
    ):
        name = type(self).__name__
        has_source = teacher_ckpt is not None or teacher_timm is not None or teacher is not None
        if self.teacher_optional and not has_source:
            orphans = [arg for arg, value in (("teacher_head", teacher_head), ("teacher_weights", teacher_weights),
                                              ("teacher_timm_kwargs", teacher_timm_kwargs)) if value is not None]
            if orphans or save_teacher:
                raise ValueError(
                    f"{name}: {', '.join(orphans) or 'save_teacher'} given without a teacher. Give teacher_ckpt, "
                    "teacher_timm or teacher, or leave every teacher argument unset to train without a teacher."
                )
        super().__init__(**kwargs)
        self.teacher: FrozenTeacher | None = None
        if has_source or not self.teacher_optional:
            self.teacher = FrozenTeacher(name, teacher_ckpt, teacher_head, teacher_timm, teacher_weights,
                                         teacher_timm_kwargs, teacher, save_teacher)
        # A plain attribute, not a buffer: no checkpoint, and no DDP buffer broadcast every step.
        self._teacher_logits_table: Tensor | None = None

    # ----------------------------------------------------------------- the teacher's logits
    def teacher_logits(self, batch: dict) -> Tensor | None:
        """The teacher's logits of ``batch["views"][0]`` (None without a teacher): online, or the
        precomputed rows of ``batch["index"]``."""
        if self.teacher is None:
            return None
        if not self.hparams.precompute_teacher_logits:
            return self.teacher(batch["views"][0])
        if self._teacher_logits_table is None:
            raise RuntimeError(
                f"{type(self).__name__}: precompute_teacher_logits=True, but the table of the teacher's logits is not "
                "computed: Trainer.fit computes it at the start of the fit. Outside a fit, set "
                "precompute_teacher_logits=False to run the teacher online."
            )
        return look_up_teacher_logits(self._teacher_logits_table, batch, type(self).__name__)

    def _precomputes(self) -> bool:
        return self.hparams.precompute_teacher_logits and self.teacher is not None

    def _check_precomputable(self) -> None:
        """Before training: the fit can give every image one set of teacher logits."""
        name = type(self).__name__
        if isinstance(self.trainer.strategy, FSDPStrategy):
            raise ValueError(
                f"{name}: precompute_teacher_logits=True runs the teacher before training, where FSDP keeps its "
                "weights sharded. Use DDP (--trainer.strategy ddp), or set precompute_teacher_logits=False."
            )
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, ViewDataModule):
            got = type(datamodule).__name__ if datamodule is not None else "dataloaders without a DataModule"
            raise TypeError(
                f"{name}: precompute_teacher_logits=True needs a ViewDataModule, which says whether its training "
                f"views are deterministic; got {got}. Train from a ViewDataModule with views='none', or set "
                "precompute_teacher_logits=False."
            )
        if not views_are_deterministic(datamodule.view_specs, datamodule.views_on_device, datamodule.batch_styles):
            views = repr(datamodule.views) if isinstance(datamodule.views, str) else "(a list of ViewSpec)"
            reasons = [reason for reason, holds in (
                ("at least one view augments", any(spec.augments for spec in datamodule.view_specs)),
                ("they are drawn on the device", datamodule.views_on_device),
                ("batch_styles restyles them", datamodule.batch_styles),
            ) if holds]
            raise ValueError(
                f"{name}: precompute_teacher_logits=True needs deterministic training views (one set of teacher logits "
                f"per image for the whole fit), but {type(datamodule).__name__}'s views={views} are random: "
                f"{'; '.join(reasons)}. Use --data.views none (resize only, no batch_styles), or leave "
                "precompute_teacher_logits off: the teacher then runs online on the student's augmented view."
            )

    def _training_loader(self) -> DataLoader:
        if self.trainer.train_dataloader is None:  # as Trainer.estimated_stepping_batches does
            self.trainer.fit_loop.setup_data()
        loader = self.trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError(
                f"{type(self).__name__}: precompute_teacher_logits=True needs one training DataLoader, got "
                f"{type(loader).__name__}. Set precompute_teacher_logits=False."
            )
        return loader

    # ----------------------------------------------------------------- Lightning hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)  # loads and checks the teacher when fitting
        if stage == "fit" and self._precomputes():
            self._check_precomputable()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self._precomputes():  # on every rank: the shares are all-gathered
            loader = self._training_loader()
            self._teacher_logits_table = compute_teacher_logits(
                self.teacher, loader.dataset, self.trainer.strategy.root_device,
                loader.batch_size or self.trainer.datamodule.batch_size, loader.num_workers, loader.collate_fn,
                self.trainer.precision_plugin.forward_context, owner=type(self).__name__,
            )

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self._teacher_logits_table is not None:
            check_table_covers(self._teacher_logits_table, len(self._training_loader().dataset), type(self).__name__)

    def on_fit_end(self) -> None:
        super().on_fit_end()
        self._teacher_logits_table = None  # a cache of this fit: give its device memory back
