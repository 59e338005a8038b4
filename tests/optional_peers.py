"""The optional peers the tests compare with. Without torch installed, `torch` is None and only
the tests marked `needs_torch` (comparisons with torch) skip; everything else still runs."""
import pytest

try:
    import torch
except ImportError:  # the tests that need no torch run without it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="a comparison with torch, which is not installed")
