"""Supervised methods: the ``Classifier`` baseline, and the base of the distillation students."""

from ssl_lightning.methods.supervised.base import SupervisedMethod
from ssl_lightning.methods.supervised.classifier import Classifier
from ssl_lightning.methods.supervised.dkd import DKD
from ssl_lightning.methods.supervised.kd import KD
from ssl_lightning.methods.supervised.nkd import NKD

__all__ = ["DKD", "KD", "NKD", "Classifier", "SupervisedMethod"]

#: the supervised methods by short name: the baseline, then the distillation students
METHODS = {cls.__name__: cls for cls in (Classifier, KD, DKD, NKD)}
