"""Command line: `python -m normcore demo`, `python -m normcore bench [options]`."""
import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m normcore", description="normcore command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="walk through the seed document's BatchNorm2d example")
    try:
        from normcore.bench import runner
    except ImportError as exc:  # an installation without the normcore.bench subpackage
        runner, missing = None, exc
    bench = sub.add_parser(
        "bench", help="time every layer against PyTorch, ONNX Runtime and NumPy",
        description="Time normcore's layers next to PyTorch, ONNX Runtime and plain NumPy (those "
                    "installed) and print GB/s of useful memory traffic against a parallel copy's. "
                    "See normcore.bench for what is measured.")
    if runner is not None:
        runner.add_arguments(bench)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from normcore import demo

        return demo.run()
    if args.command == "bench":
        if runner is None:
            raise SystemExit(f"python -m normcore bench: normcore.bench cannot be imported here ({missing})")
        return runner.main(args, argv)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
