"""`python -m benchmarks.harness [options]`, from the repository's root: see runner."""
import sys

from .runner import main

if __name__ == "__main__":
    sys.exit(main())
