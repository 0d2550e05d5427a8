"""Guided self-distillation (Borup and Andersen, NeurIPS 2021, "Even your Teacher Needs Guidance: Ground-Truth
Targets Dampen Regularization Imposed by Self-Distillation"): one round of multi-round self-distillation, a
fresh student of the same architecture trained on the labels and on the previous round's predictions."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.trainer.states import TrainerFn

from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.losses.guided_self_distillation import Objective, guided_self_distillation_terms
from ssl_lightning.methods.supervised.distillation import DistillationStudent


class GuidedSelfDistillation(DistillationStudent):
    """One round of self-distillation with ground-truth weighting:

        round 0 (no teacher):  loss = labels
        round tau >= 1:        loss = alpha * labels + (1 - alpha) * teacher

    with ``labels`` the fit of the student's softmax to the one-hot labels and ``teacher`` its fit to the
    softmax of the previous round's final model (frozen, run online on the same augmented view), both
    squared errors by default (``losses.guided_self_distillation``, whose docstring gives the terms and
    how they compare with one mixed soft target). alpha multiplies the ground-truth term.

    The rounds are separate fits: ``python -m ssl_lightning.methods.supervised.rounds`` runs them, each a
    fresh student (new random initialisation, another seed) whose teacher is the previous round's final
    checkpoint (``teacher_ckpt``). Without any teacher source this is round 0: plain training on the
    labels, and alpha is not used.

    Defaults (paper and official code, Kennethborup/self_distillation ``self_distiller.py``):

    - alpha 0.6 and 5 distillation steps (its README's command; the paper sweeps alpha);
    - objective "mse": ``F.mse_loss(F.softmax(pred), target)`` for both terms, as in the paper's
      theory (a weighted squared error); "cross_entropy" is the common alternative (see the loss);
    - the teacher of a round is the previous round's model at the end of its training (the script sets
      ``teacher = model`` after ``trainer.fit``), softmaxed at temperature 1.

    Deviations: the official code adds ``1e-4 * sum of the parameters' L2 norms`` (not squared) to the
    loss; here regularisation is the optimizer's weight decay (the CIFAR recipe documents its choice).
    Its teacher is a submodule of the Lightning student that ``freeze()`` puts in eval mode once, which
    Lightning's ``model.train()`` at the start of ``fit`` likely undoes (BatchNorm on batch statistics);
    here the teacher always runs in eval mode, on its running statistics.

    Unlabelled rows (label -1) leave the label term and keep the teacher term.

    Logged terms: ``loss/labels`` and, with a teacher, ``loss/teacher`` (unweighted). The teacher
    (``teacher``, a :class:`~ssl_lightning.components.frozen_teacher.FrozenTeacher`) is loaded in
    ``setup("fit")`` and left out of checkpoints unless ``save_teacher``; see that class.

    Args:
        alpha: weight of the ground-truth term in rounds >= 1, in [0, 1]; 1 - alpha weighs the teacher.
        objective: "mse" (squared error of the probabilities, the paper's) or "cross_entropy".
        **kwargs: the teacher's arguments (``teacher_ckpt``: the previous round's checkpoint, or any
            supervised method's; ``teacher_timm``, ...: see
            :class:`~ssl_lightning.methods.supervised.distillation.DistillationStudent`); none of them: round 0.
            Then the backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    teacher_optional = True  # round 0 learns from the labels alone

    def __init__(self, alpha: float = 0.6, objective: Objective = "mse", **kwargs: Any):
        name = type(self).__name__
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"{name}: alpha weighs the labels against the teacher and must be in [0, 1], got {alpha}.")
        if objective not in ("mse", "cross_entropy"):
            raise ValueError(f"{name}: objective must be 'mse' or 'cross_entropy', got {objective!r}.")
        super().__init__(**kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        name, state = type(self).__name__, checkpoint["state_dict"]
        taught = [key for key in state if key.startswith("teacher.")]
        fitting = self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING
        if self.teacher is None and taught:
            if fitting:  # resuming a distillation round without its teacher would go on as round 0
                raise ValueError(
                    f"{name}: this checkpoint was trained with a teacher, and no teacher was given. Resume with the "
                    "same teacher arguments (teacher_ckpt: the previous round's checkpoint), or start a new run."
                )
            # Evaluating or exporting a distilled student needs no teacher; an unloaded one keeps its
            # fingerprint (as KD's teacher without a source), and a later fit stops asking for its source.
            self.teacher = FrozenTeacher(name)
        elif self.teacher is not None and not taught:
            raise ValueError(
                f"{name}: this checkpoint was trained without a teacher (round 0), but a teacher "
                f"({self.teacher.describe()}) was given. Load it without the teacher arguments."
            )

    def shared_step(self, batch: dict) -> dict:
        images, labels = batch["views"][0], batch["label"]
        feats = self.backbone(images)
        logits = self.head(feats)
        teacher_logits = self.teacher_logits(batch)
        terms = guided_self_distillation_terms(logits, teacher_logits, labels, self.hparams.objective)
        if teacher_logits is None:
            loss = terms["labels"]
        else:
            alpha = self.hparams.alpha
            loss = alpha * terms["labels"] + (1.0 - alpha) * terms["teacher"]
        return {"loss": loss, **{f"loss/{term}": value for term, value in terms.items()}, "feats": feats,
                "logits": logits}
