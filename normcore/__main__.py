"""Command line: `python -m normcore demo`."""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m normcore", description="normcore command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="walk through the seed document's BatchNorm2d example")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from normcore import demo

        return demo.run()
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
