"""Supervised methods: the ``Classifier`` baseline, and the base of the distillation students."""

from ssl_lightning.methods.supervised.base import SupervisedMethod
from ssl_lightning.methods.supervised.classifier import Classifier

__all__ = ["Classifier", "SupervisedMethod"]

#: the supervised methods by short name
METHODS = {cls.__name__: cls for cls in (Classifier,)}
