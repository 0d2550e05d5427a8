"""Methods: one small LightningModule per method, one folder per family (docs/architecture.md)."""

from ssl_lightning import _moved
from ssl_lightning.methods import ssl, supervised, tta
from ssl_lightning.methods.ssl import (
    BYOL,
    DCL,
    DCLW,
    DINO,
    IBOT,
    MAE,
    MYOW,
    NNCLR,
    BarlowTwins,
    ISogCLR,
    MixedBarlowTwins,
    MoCHi,
    MoCoV2,
    MoCoV3,
    MSBReg,
    RandomTeachers,
    SelfDistilledMAE,
    SimCLR,
    SimSiam,
    SSLMethod,
    SupCon,
    SwAV,
    VICReg,
)
from ssl_lightning.methods.supervised import (
    DKD,
    KD,
    LSSKD,
    NKD,
    PSKD,
    SLA,
    USKD,
    Classifier,
    GuidedSelfDistillation,
    SupervisedMethod,
)
from ssl_lightning.methods.tta import EATA, RMT, ROID, SAR, BNAdapt, CoTTA, Source, Tent, TTAMethod

__all__ = [
    "BYOL", "BNAdapt", "BarlowTwins", "Classifier", "DCL", "DCLW", "DINO", "DKD", "FAMILIES", "ISogCLR", "KD",
    "METHODS", "MYOW", "MixedBarlowTwins", "MoCHi", "MoCoV2", "MoCoV3", "NKD", "NNCLR", "SSLMethod", "SimCLR",
    "SimSiam", "Source", "SupCon", "SupervisedMethod", "SwAV", "TRAINABLE", "TTAMethod", "Tent", "VICReg", "EATA", "SAR",
    "CoTTA", "RMT", "ROID", "MAE", "RandomTeachers", "LSSKD", "PSKD", "SLA", "USKD", "IBOT",
    "GuidedSelfDistillation", "SelfDistilledMAE", "MSBReg",
]

#: each family's methods by short name: "ssl" (self-supervised, ``SSLMethod``), "supervised"
#: (classification and distillation, ``SupervisedMethod``), "tta" (test-time adaptation, ``TTAMethod``)
FAMILIES: dict[str, dict[str, type]] = {"ssl": ssl.METHODS, "supervised": supervised.METHODS, "tta": tta.METHODS}

#: every method by short name (``model: BarlowTwins``): the CLI's names, ``python -m ssl_lightning
#: list``, the benchmarks, and every per-method test read this registry
METHODS: dict[str, type] = {name: cls for family in FAMILIES.values() for name, cls in family.items()}

#: the methods ``fit`` trains (self-supervised and supervised); test-time adaptation runs in ``test``
TRAINABLE: dict[str, type] = {**ssl.METHODS, **supervised.METHODS}


def __getattr__(name: str):
    return _moved.moved_attribute(__name__, name)  # LinearProbe, EMATeacher, ...: see _moved.py
