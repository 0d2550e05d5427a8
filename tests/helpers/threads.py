"""One intra-op thread for a test module of tiny tensors: on a shared 2-core machine, two threads cost
more in hand-offs than they save. Use it with ``from helpers.threads import one_thread  # noqa: F401``
(an autouse fixture, module-scoped)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
