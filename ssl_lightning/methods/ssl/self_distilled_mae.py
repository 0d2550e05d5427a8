"""Self-distillation for further pre-training (Lee, Kang, Lee, Hwang, Kawaguchi, ICLR 2023, "Self-Distillation for
Further Pre-training of Transformers"): MAE on the target data, started again from the initial pre-trained
weights, with its representation pulled towards that of the further pre-trained model, frozen."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ssl_lightning.components.classifier_files import LoadedClassifier, load_exactly
from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.export import PREFIX, backbone_state_dict, input_facts
from ssl_lightning.losses.self_distillation import self_distillation_loss
from ssl_lightning.methods.ssl.mae import MAE, read_method_checkpoint, trained_as

#: how a user makes the teacher, named in errors
FURTHER_PRETRAIN = ("further pre-train MAE on the target data first (configs/cifar10/mae_further_pretrain.yaml, "
                    "`--run_name cifar10-mae-further` writes runs/cifar10-mae-further/checkpoints/last.ckpt)")


class SelfDistilledMAE(MAE):
    """The paper's second stage, with the official code's choices (seanie12/self-distillation, ``trainer.py``
    ``SelfPreTrainer``, ``run_selftrain.sh``):

        loss = L_MAE(student) + distill_weight * 1/n sum_i || h_s(x_i) - StopGrad(h_t(x_i)) ||^2

    * The teacher is the further pre-trained model: MAE continued on the target data from the initial
      weights (``MAE`` with ``init_ckpt``/``init_weights``), its encoder given as ``teacher_ckpt``, frozen,
      in eval mode, never trained.
    * The student is an MAE started from the *same* initial weights as the further pre-training (this
      method's ``init_ckpt``/``init_weights``), not from the teacher: the distillation regularises the
      further pre-training (the paper: a further pre-trained ViT overfits the small target data).
    * h is the encoder's output for the *unmasked* image after the final norm, pooled as timm pools it:
      the class token for the default ``global_pool="token"`` (the official ``get_student_features``:
      ``sequence_output[:, 0]`` of the layer-normed encoder; the teacher, a ``ViTModel``, the same). The
      student runs one extra encoder pass on all patches, with gradient; the teacher sees the same view.
    * The distance (:func:`~ssl_lightning.losses.self_distillation.self_distillation_loss`) is the squared
      L2 distance summed over features and averaged over images; the official code adds it to the MAE
      loss unweighted (``distill_weight`` 1).
    * Optimisation (``run_selftrain.sh``, the same as its further pre-training ``run_pretrain.sh``): AdamW
      with betas (0.9, 0.95), LR 1.5e-4 at batch 64 (6e-4 per 256 images here, scaled linearly), weight
      decay 0.01, no warm-up, 20,000 steps of batch 64, mask ratio 0.75, normalised-pixel targets.

    The teacher (a :class:`FrozenEncoderTeacher`) is read in ``setup("fit")`` from ``teacher_ckpt``, one
    of our checkpoints (the further pre-trained MAE's; any method's backbone of this architecture
    loads), strictly into this method's own backbone architecture: a teacher of another architecture
    stops with an error naming a few missing, unexpected and reshaped keys. In Python, ``teacher`` may
    be an ``nn.Module`` mapping images to ``[N, D]`` representations instead. The teacher's weights stay
    out of the student's checkpoints unless ``save_teacher`` (a fingerprint of them is kept, checked on
    resume); validation, export and evaluation need no teacher file.

    Logged terms: ``loss/mae`` and ``loss/distill`` (unweighted). The online probe trains on the
    detached student representation (``probe_features="full"``, free here: the distillation pass makes
    it), or on the masked pass's (``"visible"``).

    Departures: the official schedule decays the LR linearly to 0, ours by a cosine (``warmup_cosine``
    with no warm-up); the official student starts from Hugging Face's ``facebook/vit-mae-base`` with its
    decoder, which ``init_ckpt`` (ours) matches and ``init_weights`` (a timm encoder) does not (a fresh
    decoder); images are normalised with the DataModule's mean and std, not ImageNet's.

    Args:
        distill_weight: weight of the distillation term (the official code: 1).
        teacher_ckpt: the further pre-trained MAE checkpoint whose backbone is the teacher.
        teacher: a teacher ``nn.Module`` (images -> ``[N, D]``) in Python, instead of ``teacher_ckpt``; not
            saved in the hyperparameters (pass it again to ``load_from_checkpoint`` to resume).
        save_teacher: keep the teacher's weights in the student's checkpoints.
        init_ckpt, init_weights: the initial weights the further pre-training started from (see :class:`MAE`).
        optimizer, lr, weight_decay, warmup_epochs: the official optimisation (see above).
        **kwargs: MAE's and :class:`SSLMethod`'s arguments.
    """

    def __init__(
        self,
        distill_weight: float = 1.0,
        teacher_ckpt: str | None = None,
        teacher: nn.Module | None = None,
        save_teacher: bool = False,
        optimizer: Literal["lars", "sgd", "adamw", "lamb", "adamp", "adam"] = "adamw",
        lr: float = 6e-4,
        weight_decay: float = 0.01,
        warmup_epochs: float = 0.0,
        **kwargs: Any,
    ):
        name = type(self).__name__
        if distill_weight < 0:
            raise ValueError(f"{name}: distill_weight must be >= 0 (0: further pre-training alone), got {distill_weight}.")
        teacher_module, teacher = teacher, None  # hyperparameters hold no module (checkpoints load weights_only)
        super().__init__(optimizer=optimizer, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs, **kwargs)
        self.teacher = FrozenEncoderTeacher(name, teacher_ckpt, teacher_module, save_teacher)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":  # validate, test, predict and export need no teacher
            return
        self.load_teacher(getattr(self.trainer, "datamodule", None))
        hp = self.hparams
        if hp.init_ckpt is None and hp.init_weights is None and self._custom_backbone is None:
            rank_zero_warn(
                f"{type(self).__name__}: neither init_ckpt nor init_weights is set, so the student starts from a fresh "
                "initialisation; the paper's student starts from the initial pre-trained weights the teacher's "
                "further pre-training started from. Pass the same init_ckpt or init_weights as that run."
            )

    def load_teacher(self, datamodule: Any = None) -> None:
        """Load the teacher (once) into this method's backbone architecture; Trainer.fit calls it."""
        self.teacher.load_encoder(self.build_fresh_backbone, self.describe_backbone(), self.hparams.in_chans,
                                  datamodule)

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images = batch["views"][0]
        reconstruction, pooled = self.masked_reconstruction(images)
        student = self.backbone(images)  # the unmasked image's representation, with gradient
        distill = self_distillation_loss(student, self.teacher(images))
        loss = reconstruction + hp.distill_weight * distill
        feats = student if hp.probe_features == "full" else pooled
        return {"loss": loss, "loss/mae": reconstruction, "loss/distill": distill, "feats": feats.detach()}


class FrozenEncoderTeacher(FrozenTeacher):
    """A :class:`FrozenTeacher` whose model is an encoder (images -> ``[N, D]`` representations), not a
    classifier: the backbone of one of our method checkpoints (``teacher_ckpt``), loaded strictly into a
    backbone the student builds (its own architecture), or a module given in Python. Frozen, always in
    eval mode, left out of the student's checkpoints unless ``save_in_checkpoint``, with a weight
    fingerprint checked on resume: all as ``FrozenTeacher``."""

    def __init__(self, owner: str, ckpt: str | None = None, module: nn.Module | None = None,
                 save_in_checkpoint: bool = False):
        super().__init__(owner, ckpt=ckpt, module=module, save_in_checkpoint=save_in_checkpoint)

    def describe(self) -> str:
        return f"teacher_ckpt={self.source.ckpt}" if self.source.ckpt is not None else self.source.describe()

    def load_encoder(self, build: Callable[[], nn.Module], architecture: str, in_chans: int | None = None,
                     datamodule: Any = None) -> None:
        """Read ``teacher_ckpt``'s backbone into ``build()`` (once; ``architecture`` describes it in errors),
        then check it against the student's data (channels; another normalisation is warned about)."""
        owner = self.owner
        if self.model is None:
            if self.source.ckpt is None:
                raise ValueError(
                    f"{owner} needs a teacher, and none was given: pass --model.init_args.teacher_ckpt <the further "
                    f"pre-trained MAE checkpoint> ({FURTHER_PRETRAIN}), or teacher=<nn.Module> in Python."
                )
            path = self.source.ckpt
            checkpoint = read_method_checkpoint(owner, "teacher_ckpt", path)
            with torch.random.fork_rng(devices=[]):  # its fresh weights are overwritten: leave the RNG as it was
                encoder = build()
            load_exactly(owner, "teacher", encoder, backbone_state_dict(checkpoint), architecture,
                         f"teacher_ckpt={path} ('{PREFIX}' entries of {trained_as(checkpoint)})")
            self._adopt(LoadedClassifier(encoder.eval(), None, None, input_facts(checkpoint)))
        self.source.check_fits_data(self._loaded, None, in_chans, datamodule)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The teacher's representations, without gradients."""
        if self.model is None:
            raise RuntimeError(
                f"{self.owner}: the teacher ({self.describe()}) is not loaded. Trainer.fit loads it (setup('fit')); "
                "outside a Trainer call model.load_teacher() first."
            )
        return super().forward(images)
