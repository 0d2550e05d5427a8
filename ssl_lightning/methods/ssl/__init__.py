"""Self-supervised methods: one small ``SSLMethod`` subclass per method."""

from ssl_lightning.methods.ssl.barlow_twins import BarlowTwins
from ssl_lightning.methods.ssl.base import SSLMethod
from ssl_lightning.methods.ssl.byol import BYOL
from ssl_lightning.methods.ssl.dcl import DCL, DCLW
from ssl_lightning.methods.ssl.dino import DINO
from ssl_lightning.methods.ssl.ibot import IBOT
from ssl_lightning.methods.ssl.isogclr import ISogCLR
from ssl_lightning.methods.ssl.mae import MAE
from ssl_lightning.methods.ssl.mixed_barlow_twins import MixedBarlowTwins
from ssl_lightning.methods.ssl.mochi import MoCHi
from ssl_lightning.methods.ssl.moco_v2 import MoCoV2
from ssl_lightning.methods.ssl.moco_v3 import MoCoV3
from ssl_lightning.methods.ssl.msbreg import MSBReg
from ssl_lightning.methods.ssl.myow import MYOW
from ssl_lightning.methods.ssl.nnclr import NNCLR
from ssl_lightning.methods.ssl.random_teachers import RandomTeachers
from ssl_lightning.methods.ssl.self_distilled_mae import SelfDistilledMAE
from ssl_lightning.methods.ssl.simclr import SimCLR
from ssl_lightning.methods.ssl.simsiam import SimSiam
from ssl_lightning.methods.ssl.supcon import SupCon
from ssl_lightning.methods.ssl.swav import SwAV
from ssl_lightning.methods.ssl.vicreg import VICReg

__all__ = [
    "BYOL", "DCL", "DCLW", "DINO", "IBOT", "MAE", "MSBReg", "MYOW", "NNCLR", "BarlowTwins", "ISogCLR", "MixedBarlowTwins", "MoCHi", "MoCoV2", "MoCoV3",
    "RandomTeachers", "SSLMethod", "SelfDistilledMAE", "SimCLR", "SimSiam", "SupCon", "SwAV", "VICReg",
]

#: the self-supervised methods by short name: the foundation three, the contrastive family, then
#: the non-contrastive and clustering family, then self-distillation and masked image modelling (MAE,
#: then its self-distilled further pre-training)
METHODS = {
    cls.__name__: cls
    for cls in (SimCLR, BarlowTwins, BYOL, MoCoV2, MoCHi, MoCoV3, NNCLR, DCL, DCLW, SupCon, ISogCLR,
                SimSiam, VICReg, MixedBarlowTwins, SwAV, MYOW, MSBReg, DINO, RandomTeachers, IBOT, MAE, SelfDistilledMAE)
}
