"""The method registry as the cross-cutting tests enrol it (README, "Run the tests").

Every method runs the fit, checkpoint, bf16 and host-sync tests. The costliest paths (compile, two-rank
FSDP) run one representative per family by default; the other methods carry the ``all_methods``
marker there, skipped unless selected (``pytest -m all_methods``).
"""

import pytest

from ssl_lightning.methods import FAMILIES, TRAINABLE

#: the method that stands for its family in the costliest paths of the default suite
REPRESENTATIVES = {"ssl": "BYOL", "supervised": "Classifier"}

FAMILY_OF = {name: family for family, methods in FAMILIES.items() for name in methods}

#: the module after the backbone in each family (its output dtype shows that autocast ran)
FIRST_HEAD = {"ssl": "projector", "supervised": "head"}
# MAE has no projector: its pixel decoder follows the encoder
FIRST_HEAD_OF_METHOD = {"MAE": "decoder", "SelfDistilledMAE": "decoder"}

#: what a short fit on labelled data with the kNN monitor logs, per family
FIT_METRICS = {
    "ssl": {"train/loss", "train/probe_loss", "train/probe_top1", "val/probe_top1", "val/knn_top1", "lr/probe"},
    "supervised": {"train/loss", "train/top1", "train/top5", "val/loss", "val/top1", "val/top5", "val/knn_top1"},
}


def every_method() -> list[str]:
    """The methods ``fit`` trains: test-time adaptation has its own tests (tests/methods/test_tta_*.py)."""
    return sorted(TRAINABLE)


def costly_paths() -> list:
    """Every method as a parameter; all but the family representatives marked ``all_methods``."""
    representatives = set(REPRESENTATIVES.values())
    return [pytest.param(name, marks=() if name in representatives else pytest.mark.all_methods) for name in every_method()]


def view_preset(name: str) -> str:
    """A view preset whose view count the method takes."""
    expected = TRAINABLE[name].expected_views
    fewest = expected if isinstance(expected, int) else expected[0]
    return {1: "supervised", 2: "simclr"}.get(fewest, "dino")


def first_head(model):
    name = type(model).__name__
    return getattr(model, FIRST_HEAD_OF_METHOD.get(name) or FIRST_HEAD[FAMILY_OF[name]])
