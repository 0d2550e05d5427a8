"""Self-supervised methods: one small ``SSLMethod`` subclass per method."""

from ssl_lightning.methods.ssl.barlow_twins import BarlowTwins
from ssl_lightning.methods.ssl.base import SSLMethod
from ssl_lightning.methods.ssl.byol import BYOL
from ssl_lightning.methods.ssl.dcl import DCL, DCLW
from ssl_lightning.methods.ssl.isogclr import ISogCLR
from ssl_lightning.methods.ssl.mochi import MoCHi
from ssl_lightning.methods.ssl.moco_v2 import MoCoV2
from ssl_lightning.methods.ssl.moco_v3 import MoCoV3
from ssl_lightning.methods.ssl.nnclr import NNCLR
from ssl_lightning.methods.ssl.simclr import SimCLR
from ssl_lightning.methods.ssl.supcon import SupCon

__all__ = [
    "BYOL", "DCL", "DCLW", "NNCLR", "BarlowTwins", "ISogCLR", "MoCHi", "MoCoV2", "MoCoV3", "SSLMethod", "SimCLR",
    "SupCon",
]

#: the self-supervised methods by short name: the foundation three, then the contrastive family
METHODS = {
    cls.__name__: cls
    for cls in (SimCLR, BarlowTwins, BYOL, MoCoV2, MoCHi, MoCoV3, NNCLR, DCL, DCLW, SupCon, ISogCLR)
}
