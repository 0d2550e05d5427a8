"""Losses as pure functions of tensors: no Lightning, no data, no I/O."""

from ssl_lightning.losses.barlow_twins import barlow_twins
from ssl_lightning.losses.byol import normalized_regression
from ssl_lightning.losses.cross_entropy import labelled_cross_entropy
from ssl_lightning.losses.nt_xent import nt_xent
from ssl_lightning.losses.soft_cross_entropy import soft_cross_entropy

__all__ = ["barlow_twins", "labelled_cross_entropy", "normalized_regression", "nt_xent", "soft_cross_entropy"]
