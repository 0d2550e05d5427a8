"""Building blocks methods own by composition, with no Lightning in them: heads, the EMA teacher,
the online probe, the feature queue and per-sample memory."""

from ssl_lightning.components.heads import LinearClassifier, MLPHead
from ssl_lightning.components.memory import FeatureQueue, IndexedMemory
from ssl_lightning.components.probe import OnlineProbe
from ssl_lightning.components.teacher import EMATeacher

__all__ = ["EMATeacher", "FeatureQueue", "IndexedMemory", "LinearClassifier", "MLPHead", "OnlineProbe"]
