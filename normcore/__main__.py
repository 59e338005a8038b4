"""Command line: `python -m normcore demo`.

The benchmark harness is not part of the library: it is `python -m benchmarks.harness`, run
from the root of a source checkout (benchmarks/harness/)."""
import argparse
import sys

MOVED = ("python -m normcore bench is gone: the benchmark harness lives in the source checkout's "
         "benchmarks/harness/; run `python -m benchmarks.harness [options]` from the repository's root")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m normcore", description="normcore command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="walk through the seed document's BatchNorm2d example")
    if argv[:1] == ["bench"]:  # the old command: say where it went, whatever its options
        raise SystemExit(MOVED)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from normcore import demo

        return demo.run()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
