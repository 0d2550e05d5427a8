"""Methods: one small LightningModule per method."""

from ssl_lightning.methods.barlow_twins import BarlowTwins
from ssl_lightning.methods.base import SSLMethod
from ssl_lightning.methods.byol import BYOL
from ssl_lightning.methods.finetune import FineTune
from ssl_lightning.methods.knn_eval import KNNEvaluation
from ssl_lightning.methods.linear_probe import LinearProbe
from ssl_lightning.methods.simclr import SimCLR
from ssl_lightning.methods.teacher import EMATeacher

__all__ = ["SSLMethod", "SimCLR", "BarlowTwins", "BYOL", "EMATeacher", "LinearProbe", "KNNEvaluation", "FineTune"]

#: the methods selectable by short name (``model: BarlowTwins``), listed by ``python -m ssl_lightning list``
METHODS = {cls.__name__: cls for cls in (SimCLR, BarlowTwins, BYOL)}

#: evaluations of a method checkpoint's backbone (``model: LinearProbe``), see docs/evaluation.md
EVALUATIONS = {cls.__name__: cls for cls in (LinearProbe, KNNEvaluation, FineTune)}
