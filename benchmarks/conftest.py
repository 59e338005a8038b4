import sys
from pathlib import Path

import pytest

# `pytest benchmarks/` puts only this folder on sys.path; the harness is the package
# benchmarks.harness of the checkout's root (appended: an installed normcore still comes first).
ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.append(ROOT)

from benchmarks.harness import peers, runner  # noqa: E402 - after the root is on the path

THREADS = runner.default_threads()  # 1 and all cores


@pytest.fixture(params=THREADS, ids=lambda n: f"threads={n}")
def threads(request):
    """Every implementation at the same thread count (normcore, torch, ONNX Runtime sessions
    made inside the test, NumPy's BLAS); the previous settings come back afterwards."""
    with peers.set_threads(request.param) as n:
        yield n
