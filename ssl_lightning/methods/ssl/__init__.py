"""Self-supervised methods: one small ``SSLMethod`` subclass per method."""

from ssl_lightning.methods.ssl.barlow_twins import BarlowTwins
from ssl_lightning.methods.ssl.base import SSLMethod
from ssl_lightning.methods.ssl.byol import BYOL
from ssl_lightning.methods.ssl.simclr import SimCLR

__all__ = ["BYOL", "BarlowTwins", "SSLMethod", "SimCLR"]

#: the self-supervised methods by short name
METHODS = {cls.__name__: cls for cls in (SimCLR, BarlowTwins, BYOL)}
