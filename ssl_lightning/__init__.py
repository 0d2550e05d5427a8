"""ssl_lightning: self-supervised, supervised and distillation methods as small plug-in LightningModules."""

__version__ = "0.1.0"

__all__ = ["load_backbone"]

from ssl_lightning import _moved

_moved.install()  # old import paths (before the method-families layout) keep working


def __getattr__(name: str):
    # Lazy, so that `import ssl_lightning` stays cheap (no torch / timm import until needed).
    if name == "load_backbone":
        from ssl_lightning.export import load_backbone

        return load_backbone
    raise AttributeError(f"module 'ssl_lightning' has no attribute {name!r}")
