"""Losses as pure functions of tensors: no Lightning, no data, no I/O."""

from ssl_lightning.losses.barlow_twins import barlow_twins
from ssl_lightning.losses.batch_info_nce import batch_info_nce
from ssl_lightning.losses.byol import normalized_regression
from ssl_lightning.losses.cross_entropy import labelled_cross_entropy
from ssl_lightning.losses.dcl import dcl, dclw
from ssl_lightning.losses.dino import dino_centre_update, dino_loss, dino_teacher_targets
from ssl_lightning.losses.dkd import decoupled_kd_terms, dkd_loss
from ssl_lightning.losses.isogclr import ISogCLRStep, isogclr, isogclr_temperature_step
from ssl_lightning.losses.kd import kd_loss
from ssl_lightning.losses.mixed_barlow_twins import mixed_barlow_twins_regulariser
from ssl_lightning.losses.mochi import mix_hard_negatives
from ssl_lightning.losses.moco import info_nce_with_queue
from ssl_lightning.losses.myow import mine_views, mined_view_loss
from ssl_lightning.losses.nearest_neighbour import nearest_neighbours
from ssl_lightning.losses.nkd import nkd_loss, nkd_terms
from ssl_lightning.losses.nt_xent import nt_xent
from ssl_lightning.losses.sinkhorn import sinkhorn_knopp
from ssl_lightning.losses.soft_cross_entropy import soft_cross_entropy
from ssl_lightning.losses.supcon import supcon
from ssl_lightning.losses.swav import swapped_prediction
from ssl_lightning.losses.vicreg import VICRegLoss, vicreg

__all__ = [
    "ISogCLRStep", "VICRegLoss", "barlow_twins", "batch_info_nce", "dcl", "dclw", "decoupled_kd_terms",
    "dino_centre_update", "dino_loss", "dino_teacher_targets", "dkd_loss", "info_nce_with_queue", "isogclr",
    "isogclr_temperature_step", "kd_loss", "labelled_cross_entropy", "mine_views", "mined_view_loss",
    "mix_hard_negatives", "mixed_barlow_twins_regulariser", "nearest_neighbours", "nkd_loss", "nkd_terms",
    "normalized_regression", "nt_xent", "sinkhorn_knopp", "soft_cross_entropy", "supcon", "swapped_prediction",
    "vicreg",
]
