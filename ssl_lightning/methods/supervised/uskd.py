"""USKD (Yang, Zeng, Li, Zhang, Yuan and Li, ICCV 2023, "From Knowledge Distillation to Self-Knowledge
Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels"): teacher-free
self-knowledge distillation with soft labels the student makes itself, and a weak auxiliary head."""

from __future__ import annotations

from typing import Any, Literal

from ssl_lightning.components.heads import LinearClassifier
from ssl_lightning.components.stage_features import StageFeatures, pooled
from ssl_lightning.losses import labelled_cross_entropy
from ssl_lightning.losses.uskd import RANK_SOURCES, uskd_terms
from ssl_lightning.methods.supervised.base import SupervisedMethod


class USKD(SupervisedMethod):
    """Universal self-knowledge distillation, no teacher:

        loss = ce_weight * CE(s, y) + alpha * [ -V_y log S_y ] + beta * [ -sum_{i != y} Z_i log N(S)_i ]
               + mu * CE_smooth(w, y)

    S = softmax of the classifier's logits s. V_y = S_y^2 + 1 - mean_batch(S_y^2) is the squared-target
    soft label (detached). N(S) is the softmax over the non-target logits; Z the Zipf soft labels
    (1 / rank, normalised) over the non-target classes, ranked by the official code's score, which
    mixes the weak head's and the final head's probabilities (``rank_by``). w are the logits of the
    weak head, a ``LinearClassifier`` on the global-average-pooled output of the backbone's stage
    ``aux_stage``, trained with labels smoothed 0.9 / 0.1 (``losses.uskd.uskd_terms``). The stage map
    comes from the backbone's one forward pass (``components.stage_features.StageFeatures``), so the
    weak term trains the backbone below that stage too.

    Weights: alpha multiplies the target term, beta the non-target term, mu the weak head's
    cross-entropy, ce_weight (1, the official distiller's ``ori_loss``) the classifier's
    cross-entropy. Defaults are the official CIFAR-100 config's, alpha 0.1, beta 0.1, mu 0.1
    (yzd-v/cls_KD ``configs/distillers/cifar100/res18_sd_cifar.py``); its ImageNet configs
    (``configs/distillers/imagenet/*_sd_img.py``, and ``USKDLoss``'s defaults) use alpha 1, beta 0.1,
    mu 0.005. The loss follows ``mmcls/models/dis_losses/uskd.py``, the stage
    ``mmcls/models/classifiers/distiller.py`` (``fea_s[-2]`` with the backbone's ``out_indices=(2, 3)``:
    a ResNet's third stage, 256 channels in ResNet-18, hence ``aux_stage=-2``).

    ``keep_target_in_non_target``: the non-target softmax excludes the target class in the paper and
    in the code; the code ranks the target among all C classes for the Zipf labels, which shifts the
    ranks of the classes below it by one. Default: the paper's ranks among the non-target classes;
    True: the code's (``losses.uskd.zipf_non_target_labels``).

    The weak head is for training only: ``forward``, ``embed``, validation, ``test``, ``predict`` and
    ``export`` (the backbone) give the plain classifier, at its cost. Unlabelled rows (label -1) have
    no target class: every term masks them.

    Logged terms: ``loss/ce``, ``loss/target``, ``loss/non_target``, ``loss/weak`` (unweighted).

    Args:
        alpha: weight of the target term.
        beta: weight of the non-target (Zipf) term.
        mu: weight of the weak head's cross-entropy.
        ce_weight: weight of the classifier's cross-entropy with the labels.
        aux_stage: the stage the weak head reads: an index into the backbone's stages (negative from
            the last; -2, the official choice) or a module name (``components.stage_features``).
        keep_target_in_non_target: rank the target with the others for the Zipf labels (the code).
        rank_by: "weak_and_final" (the code's score) or "final" (the classifier's logits alone).
        weak_label_smoothing: the smoothing of the weak head's labels (the code's 0.1).
        **kwargs: backbone, data, optimizer and schedule arguments of :class:`SupervisedMethod`.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        beta: float = 0.1,
        mu: float = 0.1,
        ce_weight: float = 1.0,
        aux_stage: int | str = -2,
        keep_target_in_non_target: bool = False,
        rank_by: Literal["weak_and_final", "final"] = "weak_and_final",
        weak_label_smoothing: float = 0.1,
        **kwargs: Any,
    ):
        for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu), ("ce_weight", ce_weight)):
            if value < 0:
                raise ValueError(f"USKD: {name} must be >= 0, got {value}.")
        if rank_by not in RANK_SOURCES:
            raise ValueError(f"USKD: rank_by must be one of {RANK_SOURCES}, got {rank_by!r}.")
        if not 0.0 <= weak_label_smoothing <= 1.0:
            raise ValueError(f"USKD: weak_label_smoothing must be in [0, 1] (the code's 0.1), got {weak_label_smoothing}.")
        if isinstance(aux_stage, bool) or not isinstance(aux_stage, (int, str)):
            # a bad config value: ValueError, as for the other arguments
            raise ValueError(  # noqa: TRY004
                f"USKD: aux_stage must be a stage index (e.g. -2) or a module name (e.g. 'layer3'), got {aux_stage!r}."
            )
        super().__init__(**kwargs)
        self.weak_head: LinearClassifier | None = None
        self.stage_features: StageFeatures | None = None

    def build_heads(self, feat_dim: int) -> None:
        super().build_heads(feat_dim)
        hp = self.hparams
        # Hooks on the stage's module: no module of its own, so nothing of it enters the state dict.
        self.stage_features = StageFeatures(self.backbone, [hp.aux_stage], type(self).__name__)
        (width,) = self.stage_features.channels(hp.in_chans or 3, hp.image_size or 32)
        self.weak_head = LinearClassifier(width, hp.num_classes)

    def shared_step(self, batch: dict) -> dict:
        hp = self.hparams
        images, labels = batch["views"][0], batch["label"]
        feats, (stage_map,) = self.stage_features(images)
        logits = self.head(feats)
        weak_logits = self.weak_head(pooled(stage_map))
        ce = labelled_cross_entropy(logits, labels)
        target, non_target, weak = uskd_terms(logits, weak_logits, labels, hp.keep_target_in_non_target, hp.rank_by,
                                              hp.weak_label_smoothing)
        loss = hp.ce_weight * ce + hp.alpha * target + hp.beta * non_target + hp.mu * weak
        return {"loss": loss, "loss/ce": ce, "loss/target": target, "loss/non_target": non_target, "loss/weak": weak,
                "feats": feats, "logits": logits}
