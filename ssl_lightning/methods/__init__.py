"""Methods: one small LightningModule per method, one folder per family (docs/architecture.md)."""

from ssl_lightning import _moved
from ssl_lightning.methods import ssl, supervised
from ssl_lightning.methods.ssl import (
    BYOL,
    DCL,
    DCLW,
    DINO,
    MYOW,
    NNCLR,
    BarlowTwins,
    ISogCLR,
    MixedBarlowTwins,
    MoCHi,
    MoCoV2,
    MoCoV3,
    SimCLR,
    SimSiam,
    SSLMethod,
    SupCon,
    SwAV,
    VICReg,
)
from ssl_lightning.methods.supervised import DKD, KD, NKD, Classifier, SupervisedMethod

__all__ = [
    "BYOL", "BarlowTwins", "Classifier", "DCL", "DCLW", "DINO", "DKD", "FAMILIES", "ISogCLR", "KD", "METHODS", "MYOW",
    "MixedBarlowTwins", "MoCHi", "MoCoV2", "MoCoV3", "NKD", "NNCLR", "SSLMethod", "SimCLR", "SimSiam", "SupCon",
    "SupervisedMethod", "SwAV", "VICReg",
]

#: each family's methods by short name: "ssl" (self-supervised, ``SSLMethod``), "supervised"
#: (classification and distillation, ``SupervisedMethod``)
FAMILIES: dict[str, dict[str, type]] = {"ssl": ssl.METHODS, "supervised": supervised.METHODS}

#: every method by short name (``model: BarlowTwins``): the CLI's names, ``python -m ssl_lightning
#: list``, the benchmarks, and every per-method test read this registry
METHODS: dict[str, type] = {name: cls for family in FAMILIES.values() for name, cls in family.items()}


def __getattr__(name: str):
    return _moved.moved_attribute(__name__, name)  # LinearProbe, EMATeacher, ...: see _moved.py
