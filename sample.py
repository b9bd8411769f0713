"""Sample from a trained model, as nanoGPT's sample.py: python sample.py --out_dir=out-shakespeare-char

A thin shim: the logic is glassgpt.sample.main (also `glassgpt sample`)."""

import sys

from glassgpt.errors import run_main
from glassgpt.sample import main

if __name__ == "__main__":
    sys.exit(run_main(main))
