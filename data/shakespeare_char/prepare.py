"""Tiny-shakespeare at character level, into this directory (nanoGPT's data/shakespeare_char/prepare.py).

    python data/shakespeare_char/prepare.py [--input=PATH] [--out_dir=DIR]
    GLASSGPT_MIRROR=../shared/data python data/shakespeare_char/prepare.py     # offline

Vocabulary: the 65 characters of the text; first 90% of it train (1,003,854 tokens), last 10% val
(111,540). The work is done by glassgpt.prepare (`glassgpt prepare shakespeare_char`).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a clone without installing, as nanoGPT's scripts do

from glassgpt.errors import run_main  # noqa: E402
from glassgpt.prepare import main  # noqa: E402

if __name__ == "__main__":
    # our directory is the default out_dir (like nanoGPT); a later --out_dir=... on the command line wins
    sys.exit(run_main(main, ["shakespeare_char", f"--out_dir={HERE}", *sys.argv[1:]]))
