"""Random training batches from a prepared token stream, reproducibly.

Like nanoGPT, a batch is `batch_size` random windows of `block_size + 1` tokens (inputs and the
next-token targets). Unlike nanoGPT, sampling uses its own `torch.Generator` whose state is saved in
checkpoints, so a resumed run draws exactly the batches the uninterrupted run would have; and
evaluation draws from a fixed generator, so every eval scores the same batches and losses are
comparable across a run (and evaluation never disturbs the training stream).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from glassgpt.errors import UserError


def data_dir_for(dataset: str, data_dir: str | None) -> Path:
    """Training's view of glassgpt.corpus.resolve_data_dir (the one data-directory rule)."""
    from glassgpt.corpus import resolve_data_dir

    return resolve_data_dir({"dataset": dataset}, data_dir)  # type: ignore[return-value]


def require_prepared(data_dir: Path) -> None:
    """One line naming the command that prepares a missing dataset."""
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if not path.exists():
            name = data_dir.name
            raise UserError(f"dataset {name!r} is not prepared ({path} is missing); run "
                            f"`python data/{name}/prepare.py` (or `glassgpt prepare {name}`)")


class BatchSampler:
    def __init__(self, data_dir: str | Path, block_size: int, batch_size: int, device: str, seed: int,
                 rank: int = 0):
        self.data_dir = Path(data_dir)
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.seed, self.rank = seed, rank
        self.data: dict[str, np.memmap] = {}
        require_prepared(self.data_dir)
        for split in ("train", "val"):
            path = self.data_dir / f"{split}.bin"
            arr = np.memmap(path, dtype=np.uint16, mode="r")
            if len(arr) <= block_size + 1:
                raise UserError(f"{path} holds {len(arr)} tokens, too few for block_size={block_size}; "
                                "use a smaller --block_size or more data")
            # uint16 on disk, memmapped: the page cache holds one copy for every rank and process, and
            # only a batch is widened to int64 (an int64 copy of the split would be 4x the file, per rank)
            self.data[split] = arr
        # distinct stream per DDP rank (nanoGPT's seed_offset)
        self.train_gen = torch.Generator().manual_seed(seed + rank)
        self._offsets = torch.arange(block_size + 1)

    def max_token(self) -> int:
        return max(int(d.max()) for d in self.data.values())

    def draw(self, split: str, gen: torch.Generator | None = None) -> torch.Tensor:
        """The start positions of one batch (B,), advancing `gen` (the training stream by default)."""
        gen = gen if gen is not None else self.train_gen
        return torch.randint(len(self.data[split]) - self.block_size - 1, (self.batch_size,), generator=gen)

    def get_batch(self, split: str, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch_at(split, self.draw(split, gen))

    def batch_at(self, split: str, ix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) (B, T) int64 on the device for the windows starting at `ix`."""
        xy = torch.from_numpy(self.data[split][(ix[:, None] + self._offsets).numpy()].astype(np.int64))  # (B, T+1)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.startswith("cuda"):
            # pinned memory lets the host->device copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.contiguous().to(self.device), y.contiguous().to(self.device)

    def eval_generator(self, split: str) -> torch.Generator:
        """The same eval batches every time (per split and rank)."""
        return torch.Generator().manual_seed(self.seed * 7919 + (0 if split == "train" else 1) + 2 * self.rank)

    def state_dict(self) -> dict:
        return {"train_gen": self.train_gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.train_gen.set_state(state["train_gen"])
