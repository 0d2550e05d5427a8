"""Building blocks methods own by composition, with no Lightning in them: heads, the EMA teacher,
the online probe, the feature queue and per-sample memory, SwAV's prototypes, DirectPred's predictor."""

from ssl_lightning.components.direct_pred import DirectPredictor
from ssl_lightning.components.heads import LinearClassifier, MLPHead, Prototypes
from ssl_lightning.components.memory import FeatureQueue, IndexedMemory
from ssl_lightning.components.probe import OnlineProbe
from ssl_lightning.components.teacher import EMATeacher

__all__ = [
    "DirectPredictor", "EMATeacher", "FeatureQueue", "IndexedMemory", "LinearClassifier", "MLPHead", "OnlineProbe",
    "Prototypes",
]
