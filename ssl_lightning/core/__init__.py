"""What every trainable method shares: ``TrainModule`` and the optimization, non-finite-loss,
data-fact and step-logging pieces it is made of."""

from ssl_lightning.core.module import TrainModule
from ssl_lightning.core.optimization import OptimizationConfig, configure_optimization

__all__ = ["OptimizationConfig", "TrainModule", "configure_optimization"]
