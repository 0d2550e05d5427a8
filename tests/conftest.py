import os

import pytest
import torch

# Tests run on 2 CPU cores; more intra-op threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    """Lightning writes logs and checkpoints to the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)
