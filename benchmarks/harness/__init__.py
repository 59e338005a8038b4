"""The benchmark harness: normcore against PyTorch, ONNX Runtime and plain NumPy.

It lives in the source checkout's benchmarks/ folder and is not installed with the library;
run it from the repository's root:

    python -m benchmarks.harness [--quick] [--threads N ...] [--layers ...] [--impls ...]

    cases    the matrix: layers, modes, shapes, and the useful memory traffic of each case
    peers    one factory per implementation, the thread setter, a correctness cross-check
    runner   timing, the copy-bandwidth yardstick, tables, Markdown, the plot, the command

Only NumPy (and normcore) are imported here; torch, onnxruntime/onnx and matplotlib are
imported when they are used.
"""
