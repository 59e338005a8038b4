import pytest

from normcore.bench import peers, runner

THREADS = runner.default_threads()  # 1 and all cores


@pytest.fixture(params=THREADS, ids=lambda n: f"threads={n}")
def threads(request):
    """Every implementation at the same thread count (normcore, torch, ONNX Runtime sessions
    made inside the test, NumPy's BLAS); the previous settings come back afterwards."""
    with peers.set_threads(request.param) as n:
        yield n
