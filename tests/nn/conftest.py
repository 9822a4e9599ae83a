"""Run the normlab.nn tests on one intra-op thread, then restore the setting for the rest of the session.

Their tensors are tiny: extra threads only add synchronisation, and on a shared 2-core machine an
oversubscribed thread pool made these tests ~6x slower.
"""

import pytest
import torch


@pytest.fixture(scope="package", autouse=True)
def single_intra_op_thread():
    """One torch thread while this package's tests run."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
