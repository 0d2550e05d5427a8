"""Evaluations of a trained checkpoint's backbone: linear probe, kNN, fine-tuning."""

from ssl_lightning.evaluation.finetune import FineTune
from ssl_lightning.evaluation.knn import KNNEvaluation
from ssl_lightning.evaluation.linear_probe import LinearProbe
from ssl_lightning.evaluation.pretrained import PretrainedBackboneModule

__all__ = ["EVALUATIONS", "FineTune", "KNNEvaluation", "LinearProbe", "PretrainedBackboneModule"]

#: evaluations of a method checkpoint's backbone (``model: LinearProbe``), see docs/evaluation.md
EVALUATIONS = {cls.__name__: cls for cls in (LinearProbe, KNNEvaluation, FineTune)}
