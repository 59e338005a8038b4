"""Benchmarks of normcore against PyTorch, ONNX Runtime and plain NumPy.

    cases    the matrix: layers, modes, shapes, and the useful memory traffic of each case
    peers    one factory per implementation, the thread setter, a correctness cross-check
    runner   timing, the copy-bandwidth yardstick, tables, Markdown, the plot, the command
             (`python -m normcore bench`)

Only NumPy (and normcore) are imported here; torch, onnxruntime/onnx and matplotlib are
imported when they are used.
"""
