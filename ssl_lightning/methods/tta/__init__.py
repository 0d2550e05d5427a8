"""Test-time adaptation: a source classifier adapted on a stream of test batches inside ``test``."""

from ssl_lightning.methods.tta.base import TTAMethod
from ssl_lightning.methods.tta.bn_adapt import BNAdapt
from ssl_lightning.methods.tta.cotta import CoTTA
from ssl_lightning.methods.tta.eata import EATA
from ssl_lightning.methods.tta.rmt import RMT
from ssl_lightning.methods.tta.roid import ROID
from ssl_lightning.methods.tta.sar import SAR
from ssl_lightning.methods.tta.source import Source
from ssl_lightning.methods.tta.tent import Tent

__all__ = ["BNAdapt", "CoTTA", "EATA", "RMT", "ROID", "SAR", "Source", "TTAMethod", "Tent"]

#: the test-time adaptation methods by short name, in the benchmark's table order
METHODS = {cls.__name__: cls for cls in (Source, BNAdapt, Tent, EATA, SAR, CoTTA, RMT, ROID)}
