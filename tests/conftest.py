import os

import pytest
import torch

from helpers.fakes import TINY_BACKBONE

# Tests run on 2 CPU cores; more intra-op threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Lightning writes logs and checkpoints to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def method_checkpoint(tmp_path_factory):
    """A 2-step tiny SimCLR checkpoint on Digits, for the evaluations of a checkpoint."""
    # Imported here, not at the top: Lightning, imported before pytest's log capture is installed,
    # gives its logger a handler of its own and stops propagation, which empties caplog.
    import lightning as L

    from ssl_lightning.datamodules import Digits
    from ssl_lightning.methods import SimCLR

    # Seeded, so the evaluations' accuracy thresholds do not depend on what earlier tests drew.
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SimCLR(**TINY_BACKBONE, proj_hidden_dim=32, proj_dim=16, optimizer="adamw", lr=1e-3)
        trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, Digits(batch_size=32, num_workers=0, seed=0))
    path = tmp_path_factory.mktemp("method") / "method.ckpt"
    trainer.save_checkpoint(path)
    return path


def pytest_collection_modifyitems(config, items):
    """``all_methods`` tests (the costliest paths for methods other than their family's
    representative, see helpers/registry.py) run only when the marker expression names them."""
    if "all_methods" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="a costly path for a non-representative method: run with -m all_methods")
    for item in items:
        if "all_methods" in item.keywords:
            item.add_marker(skip)
