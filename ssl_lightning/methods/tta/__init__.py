"""Test-time adaptation: a source classifier adapted on a stream of test batches inside ``test``."""

from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.bn_adapt import BNAdapt
from ssl_lightning.methods.tta.source import Source
from ssl_lightning.methods.tta.tent import Tent

__all__ = ["BNAdapt", "Source", "TTAMethod", "Tent"]

#: the test-time adaptation methods by short name, in the benchmark's table order
METHODS = {cls.__name__: cls for cls in (Source, BNAdapt, Tent)}
