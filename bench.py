"""nanoGPT's bench.py habit: python bench.py [--key=value ...]. Logic: glassgpt/bench.py."""

import sys

from glassgpt.bench import main
from glassgpt.errors import run_main

if __name__ == "__main__":
    sys.exit(run_main(main))
