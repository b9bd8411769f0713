"""OpenWebText (or any corpus) in GPT-2 BPE, into this directory (nanoGPT's data/openwebtext/prepare.py).

    python data/openwebtext/prepare.py [--num_proc=8]                      # Hugging Face: needs `datasets` + network
    python data/openwebtext/prepare.py --input=docs.jsonl --val_fraction=0.01  # local .txt/.jsonl files or dirs

Documents are split into train/val (seed 2357, val_fraction 0.0005 as nanoGPT), tokenized in worker
processes with <|endoftext|> after each. The work is done by glassgpt.prepare
(`glassgpt prepare openwebtext`, or `glassgpt prepare corpus --input=...`).
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a clone without installing, as nanoGPT's scripts do

from glassgpt.errors import run_main  # noqa: E402
from glassgpt.prepare import main  # noqa: E402

if __name__ == "__main__":
    # our directory is the default out_dir (like nanoGPT); a later --out_dir=... on the command line wins
    sys.exit(run_main(main, ["openwebtext", f"--out_dir={HERE}", *sys.argv[1:]]))
