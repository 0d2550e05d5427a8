"""Building blocks methods own by composition, with no Lightning in them: heads, the EMA teacher,
the online probe."""

from ssl_lightning.components.heads import LinearClassifier, MLPHead
from ssl_lightning.components.probe import OnlineProbe
from ssl_lightning.components.teacher import EMATeacher

__all__ = ["EMATeacher", "LinearClassifier", "MLPHead", "OnlineProbe"]
