"""Tiny-shakespeare in GPT-2 BPE, into this directory (nanoGPT's data/shakespeare/prepare.py).

    python data/shakespeare/prepare.py [--input=PATH] [--vocab_dir=DIR] [--out_dir=DIR]

First 90% of the characters train (301,966 tokens), last 10% val (36,059). Offline, the GPT-2
vocabulary comes from --vocab_dir or $GLASSGPT_MIRROR/gpt2. The work is done by glassgpt.prepare
(`glassgpt prepare shakespeare`).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a clone without installing, as nanoGPT's scripts do

from glassgpt.errors import run_main  # noqa: E402
from glassgpt.prepare import main  # noqa: E402

if __name__ == "__main__":
    # our directory is the default out_dir (like nanoGPT); a later --out_dir=... on the command line wins
    sys.exit(run_main(main, ["shakespeare", f"--out_dir={HERE}", *sys.argv[1:]]))
