"""Supervised methods: the ``Classifier`` baseline, the distillation students, and the teacher-free
self-distillation methods."""

from ssl_lightning.methods.supervised.base import SupervisedMethod
from ssl_lightning.methods.supervised.classifier import Classifier
from ssl_lightning.methods.supervised.dkd import DKD
from ssl_lightning.methods.supervised.guided_self_distillation import GuidedSelfDistillation
from ssl_lightning.methods.supervised.kd import KD
from ssl_lightning.methods.supervised.lsskd import LSSKD
from ssl_lightning.methods.supervised.nkd import NKD
from ssl_lightning.methods.supervised.pskd import PSKD
from ssl_lightning.methods.supervised.sla import SLA
from ssl_lightning.methods.supervised.uskd import USKD

__all__ = ["DKD", "KD", "GuidedSelfDistillation", "LSSKD", "NKD", "PSKD", "SLA", "USKD", "Classifier",
           "SupervisedMethod"]

#: the supervised methods by short name: the baseline, the distillation students, then self-distillation
METHODS = {cls.__name__: cls for cls in (Classifier, KD, DKD, NKD, USKD, PSKD, SLA, LSSKD,
                                         GuidedSelfDistillation)}
