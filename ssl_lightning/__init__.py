"""ssl_lightning: self-supervised learning methods as small plug-in LightningModules."""

__version__ = "0.1.0"
