"""Building blocks methods own by composition, with no Lightning in them: heads (SwAV's prototypes,
DINO's head), the EMA teacher, the frozen distillation teacher, the online probe, the feature
queue and per-sample memory, DirectPred's predictor, and multi-crop (one backbone pass per crop
size, the cross-view pairs)."""

from ssl_lightning.components.direct_pred import DirectPredictor
from ssl_lightning.components.frozen_teacher import FrozenTeacher
from ssl_lightning.components.heads import DINOHead, LinearClassifier, MLPHead, Prototypes, WeightNormLinear
from ssl_lightning.components.memory import FeatureQueue, IndexedMemory
from ssl_lightning.components.multicrop import cross_view_pairs, forward_per_resolution, global_views
from ssl_lightning.components.probe import OnlineProbe
from ssl_lightning.components.teacher import EMATeacher

__all__ = [
    "DINOHead", "DirectPredictor", "EMATeacher", "FeatureQueue", "FrozenTeacher", "IndexedMemory", "LinearClassifier",
    "MLPHead", "OnlineProbe", "Prototypes", "WeightNormLinear", "cross_view_pairs", "forward_per_resolution",
    "global_views",
]
