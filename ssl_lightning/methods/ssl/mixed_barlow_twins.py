"""Mixed Barlow Twins (Bandara et al., 2023): Barlow Twins plus a mixup regulariser of the
cross-correlations, against feature overfitting."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ssl_lightning.components.heads import MLPHead
from ssl_lightning.losses.barlow_twins import barlow_twins
from ssl_lightning.losses.mixed_barlow_twins import mixed_barlow_twins_regulariser
from ssl_lightning.methods.ssl.barlow_twins import BarlowTwins


class MixedBarlowTwins(BarlowTwins):
    """Mixed Barlow Twins ("Guarding Barlow Twins Against Overfitting with Mixed Samples",
    github.com/wgcban/mix-bt): each step also embeds ``x_m = lambda x1 + (1 - lambda) x2[perm]``
    (one lambda ~ Beta(alpha, alpha) and one permutation per batch and process) and adds

        reg_scale * lambda_offdiag * mixed_barlow_twins_regulariser(z1, z2, z_m, perm, lambda)

    to the Barlow Twins loss (mix-bt main.py: ``mixup_loss_scale * lmbda * (...)``); ``loss_scale``
    multiplies the sum. Defaults are Barlow Twins' (projector 8192-8192-8192, lambda 5e-3, LARS
    LR 0.2 per 256, weight decay 1.5e-6) with Beta(1, 1) and ``reg_scale`` 1: the ImageNet
    1000-epoch setting (lambda_reg 2.0 there multiplies half the sum, main_imagenet.py).

    Departures: the regulariser weight is constant (main.py; main_imagenet.py ramps it up over
    the warm-up), and the projections are not L2-normalised before the standardisation (mix-bt's
    CIFAR model does; its ImageNet model does not).

    Args:
        reg_scale: weight of the regulariser relative to ``lambda_offdiag`` (mix-bt's
            ``mixup_loss_scale``; 4 in its CIFAR-10 / CIFAR-100 recipes, 2 for STL-10).
        mix_alpha: Beta(alpha, alpha) of the mixing weight lambda.
        proj_num_layers: projector depth (3 on ImageNet; mix-bt's CIFAR projector has 2).
        lambda_offdiag, loss_scale, proj_hidden_dim, proj_dim: as in :class:`BarlowTwins`.
        **kwargs: backbone, optimizer and schedule arguments of :class:`BarlowTwins`.
    """

    def __init__(
        self,
        reg_scale: float = 1.0,
        mix_alpha: float = 1.0,
        proj_num_layers: int = 3,
        lambda_offdiag: float = 5e-3,
        loss_scale: float = 1.0,
        proj_hidden_dim: int = 8192,
        proj_dim: int = 8192,
        **kwargs,
    ):
        # Barlow Twins' arguments are repeated so that the signature shows every hyperparameter
        # (the CLI's help, and the head widths that helpers.fakes.tiny_method narrows).
        super().__init__(
            lambda_offdiag=lambda_offdiag, loss_scale=loss_scale, proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim,
            **kwargs,
        )
        if mix_alpha <= 0:
            raise ValueError(f"MixedBarlowTwins: mix_alpha is a Beta concentration and must be > 0, got {mix_alpha}")
        self.reg_scale = reg_scale
        self.mix_alpha = mix_alpha
        self.proj_num_layers = proj_num_layers

    def build_heads(self, feat_dim: int) -> None:
        self.projector = MLPHead(
            feat_dim, self.proj_hidden_dim, self.proj_dim, num_layers=self.proj_num_layers, bias=False
        )

    def mix_views(self, view1: Tensor, view2: Tensor) -> tuple[Tensor, Tensor, float]:
        """``(lambda x1 + (1 - lambda) x2[perm], perm, lambda)``. Views are normalised images, and
        normalisation is affine, so the mix of normalised views is the normalised mix."""
        # Drawn on the host (NumPy, as mix-bt and timm's Mixup do): nothing is read from the device.
        mix_ratio = float(np.random.beta(self.mix_alpha, self.mix_alpha))
        perm = torch.randperm(view1.shape[0], device=view1.device)
        return mix_ratio * view1 + (1 - mix_ratio) * view2[perm], perm, mix_ratio

    def shared_step(self, batch: dict) -> dict:
        view1, view2 = batch["views"]
        mixed, perm, mix_ratio = self.mix_views(view1, view2)
        # Separate forward passes, as in mix-bt: each batch gets its own BatchNorm statistics.
        feats1 = self.backbone(view1)
        z1, z2, z_mixed = self.projector(feats1), self.projector(self.backbone(view2)), self.projector(self.backbone(mixed))
        redundancy = barlow_twins(z1, z2, self.lambda_offdiag)
        regulariser = mixed_barlow_twins_regulariser(z1, z2, z_mixed, perm, mix_ratio)
        loss = self.loss_scale * (redundancy + self.reg_scale * self.lambda_offdiag * regulariser)
        return {
            "loss": loss,
            "loss/barlow_twins": redundancy.detach(),
            "loss/mixup": regulariser.detach(),
            "feats": feats1,
            "embeds": z1,
        }
