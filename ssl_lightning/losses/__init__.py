"""Losses as pure functions of tensors: no Lightning, no data, no I/O."""

from ssl_lightning.losses.barlow_twins import barlow_twins
from ssl_lightning.losses.batch_info_nce import batch_info_nce
from ssl_lightning.losses.byol import normalized_regression
from ssl_lightning.losses.cross_entropy import labelled_cross_entropy
from ssl_lightning.losses.dcl import dcl, dclw
from ssl_lightning.losses.dino import dino_centre_update, dino_loss, dino_teacher_targets
from ssl_lightning.losses.dkd import decoupled_kd_terms, dkd_loss
from ssl_lightning.losses.eata import eata_entropy_loss, eata_sample_weights, fisher_penalty
from ssl_lightning.losses.entropy import softmax_entropy
from ssl_lightning.losses.guided_self_distillation import guided_self_distillation_loss, guided_self_distillation_terms
from ssl_lightning.losses.ibot import ibot_patch_loss, ibot_patch_targets
from ssl_lightning.losses.isogclr import ISogCLRStep, isogclr, isogclr_temperature_step
from ssl_lightning.losses.kd import kd_loss
from ssl_lightning.losses.koleo import koleo_loss
from ssl_lightning.losses.lsskd import lsskd_terms
from ssl_lightning.losses.mae import mae_loss, normalised_pixel_target, patchify, unpatchify
from ssl_lightning.losses.mixed_barlow_twins import mixed_barlow_twins_regulariser
from ssl_lightning.losses.mochi import mix_hard_negatives
from ssl_lightning.losses.moco import info_nce_with_queue
from ssl_lightning.losses.msbreg import brownian_diffusive_loss, multiview_centroid_loss, singular_value_loss
from ssl_lightning.losses.myow import mine_views, mined_view_loss
from ssl_lightning.losses.nearest_neighbour import nearest_neighbours
from ssl_lightning.losses.nkd import nkd_loss, nkd_terms
from ssl_lightning.losses.nt_xent import nt_xent
from ssl_lightning.losses.pskd import pskd_alpha, pskd_loss, pskd_targets
from ssl_lightning.losses.roid import certainty_diversity_weights, prior_correction, soft_likelihood_ratio
from ssl_lightning.losses.sar import reliable_entropy_loss
from ssl_lightning.losses.self_distillation import self_distillation_loss
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp
from ssl_lightning.losses.sla import sla_joint_loss, sla_sd_loss, sla_sd_terms
from ssl_lightning.losses.soft_cross_entropy import soft_cross_entropy
from ssl_lightning.losses.supcon import supcon
from ssl_lightning.losses.swav import swapped_prediction
from ssl_lightning.losses.tta_consistency import (
    prototype_contrastive_loss,
    symmetric_cross_entropy,
    teacher_cross_entropy,
)
from ssl_lightning.losses.uskd import uskd_loss, uskd_terms
from ssl_lightning.losses.vicreg import VICRegLoss, vicreg

__all__ = [
    "ISogCLRStep", "VICRegLoss", "barlow_twins", "batch_info_nce", "certainty_diversity_weights", "dcl",
    "dclw", "decoupled_kd_terms", "dino_centre_update", "dino_loss", "dino_teacher_targets", "dkd_loss",
    "eata_entropy_loss", "eata_sample_weights", "fisher_penalty", "guided_self_distillation_loss",
    "guided_self_distillation_terms", "ibot_patch_loss", "ibot_patch_targets",
    "info_nce_with_queue", "isogclr", "isogclr_temperature_step", "kd_loss", "koleo_loss",
    "labelled_cross_entropy", "lsskd_terms", "mae_loss", "mine_views", "mined_view_loss",
    "mix_hard_negatives", "mixed_barlow_twins_regulariser", "nearest_neighbours", "nkd_loss", "nkd_terms",
    "normalised_pixel_target", "normalized_regression", "nt_xent", "patchify", "prior_correction",
    "prototype_contrastive_loss", "pskd_alpha", "pskd_loss", "pskd_targets", "reliable_entropy_loss",
    "self_distillation_loss", "sinkhorn_knopp", "sla_joint_loss", "sla_sd_loss", "sla_sd_terms", "soft_cross_entropy",
    "soft_likelihood_ratio", "softmax_entropy", "supcon", "swapped_prediction", "symmetric_cross_entropy",
    "teacher_cross_entropy", "unpatchify", "uskd_loss", "uskd_terms", "vicreg",
    # MSBReg's three losses
    "brownian_diffusive_loss", "multiview_centroid_loss", "singular_value_loss",
]
