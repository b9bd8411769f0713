"""The training log: metrics as JSON lines in out_dir/log.jsonl, and the loss curve out_dir/loss.png."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_NAME = "log.jsonl"


@dataclass
class RunLog:
    """Metrics as JSON lines in out_dir/log.jsonl (appended across resumes) and in memory."""

    path: Path | None
    records: list[dict] = field(default_factory=list)

    def truncate(self, resumed_at: int, keep_eval: bool = True) -> None:
        """Drop what a resumed run will write again: step records from `resumed_at` on and eval
        records after it (or from it, when the resumed run evaluates `resumed_at` again: keep_eval
        False), so no iteration appears twice in the log or loss.png."""
        if self.path is None or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and _kept(json.loads(line), resumed_at, keep_eval)]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, **rec: Any) -> None:
        self.records.append(rec)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def _kept(rec: dict, resumed_at: int, keep_eval: bool) -> bool:
    it = rec.get("iter", -1)
    return it < resumed_at or (keep_eval and it == resumed_at and "val_loss" in rec)


def plot_losses(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["iter"], r["train_loss"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if steps:
        ax.plot(*zip(*steps, strict=False), lw=0.8, alpha=0.6, label="train (batch)")
    if evals:
        it, tr, va = zip(*evals, strict=False)
        ax.plot(it, tr, "o-", label="train (eval)")
        ax.plot(it, va, "o-", label="val (eval)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
