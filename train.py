"""nanoGPT's entry point, unchanged habits: python train.py config/train_shakespeare_char.py --device=cpu

All logic lives in glassgpt/train.py; this shim only runs it (also under torchrun).
"""

import sys

from glassgpt.distributed import finish_process
from glassgpt.errors import run_main
from glassgpt.train import main

if __name__ == "__main__":
    sys.exit(finish_process(run_main(main)))
