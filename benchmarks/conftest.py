import numpy as np
import pytest

import normcore as nc


@pytest.fixture(params=[1, 2], ids=lambda n: f"threads={n}")
def threads(request):
    """Run normcore and PyTorch at the same thread count."""
    n = request.param
    nc.set_num_threads(n)
    try:
        import torch

        old = torch.get_num_threads()
        torch.set_num_threads(n)
    except ImportError:
        torch = None
    yield n
    nc.set_num_threads(None)
    if torch is not None:
        torch.set_num_threads(old)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
