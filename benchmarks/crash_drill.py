"""Crash drill: kill -9 training, span-index builds and kNN-store builds at random moments.

    python -m benchmarks.crash_drill                      # 14 training kills + 4 span + 4 kNN builds
    python -m benchmarks.crash_drill --train=20 --spans=5 --knn=5 --seed=1

After every kill the previous artifact must still be there and load (ckpt.pt by
`torch.load(weights_only=True)` and glassgpt's loader, whose sidecar must agree), training must resume
from it, a query must give a correct answer (the same JSON as an index built without kills) or one
clean error line, and once the next run has finished no temporary file (`.NAME.tmpPID`,
`.NAME.oldPID`, anything with "tmp" in its name) may be left. Prints the counts: kills, kills that
landed inside a checkpoint / artifact write, corrupt, failed resumes, wrong answers, leftovers.
tests/test_crash_drill.py runs it as a slow test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LEFTOVER = re.compile(r"(^\..+\.(tmp|old)\d+$)|tmp", re.IGNORECASE)
MODEL = ["--n_layer=4", "--n_head=4", "--n_embd=128", "--block_size=64"]  # ~0.8M params: ~10 MB checkpoints


@dataclass
class Counts:
    kills: int = 0
    during_write: int = 0
    corrupt: int = 0
    failed_resumes: int = 0
    wrong_answers: int = 0
    leftovers: int = 0
    sidecar_lag: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self, what: str) -> str:
        return (f"{what}: kills {self.kills} (inside a write: {self.during_write}), corrupt {self.corrupt}, "
                f"failed resumes {self.failed_resumes}, wrong answers {self.wrong_answers}, "
                f"leftovers {self.leftovers}, "
                f"ckpt.json behind ckpt.pt {self.sidecar_lag}")


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def glassgpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "glassgpt.cli", *args]


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if LEFTOVER.search(p.name) and not p.name.endswith(".fingerprint.json")]


def kill_after(cmd: list[str], ready: str, delay: float) -> tuple[bool, str]:
    """Start `cmd`, wait until `ready` appears in its output, then SIGKILL it `delay` s later.
    (True, output) if it was killed, (False, output) if it ended first."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)
    out = []
    assert p.stdout is not None
    for line in p.stdout:
        out.append(line)
        if ready in line:
            break
    time.sleep(delay)
    killed = p.poll() is None
    if killed:
        os.kill(p.pid, signal.SIGKILL)
    rest = p.communicate()[0] or ""
    return killed, "".join(out) + rest


def seconds_after(cmd: list[str], ready: str) -> float:
    """Seconds `cmd` runs after printing `ready` (the part of a build a kill should land in)."""
    p = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         bufsize=1)
    assert p.stdout is not None
    t0 = None
    for line in p.stdout:
        if t0 is None and ready in line:
            t0 = time.perf_counter()
    p.wait()
    return time.perf_counter() - (t0 or time.perf_counter())


def check_checkpoint(out_dir: Path, c: Counts) -> int | None:
    """The checkpoint loads safely and its sidecar agrees; its iteration, or None if corrupt."""
    import torch

    from glassgpt.checkpoint import load_checkpoint
    from glassgpt.errors import UserError

    try:
        raw = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
        ck = load_checkpoint(out_dir)
        side = json.loads((out_dir / "ckpt.json").read_text())
        if side.get("iter_num") != raw["iter_num"]:  # killed between the two renames: ckpt.pt is trusted
            c.sidecar_lag += 1
            c.notes.append(f"sidecar iter {side.get('iter_num')} != ckpt iter {raw['iter_num']} "
                           "(loader trusts ckpt.pt)")
        return int(ck["iter_num"])
    except (UserError, RuntimeError, OSError, KeyError, json.JSONDecodeError) as e:
        c.corrupt += 1
        c.notes.append(f"corrupt checkpoint: {type(e).__name__}: {e}"[:300])
        return None


def train_args(data: Path, out: Path, max_iters: int, init: str) -> list[str]:
    return ["train", "--device=cpu", "--compile=False", *MODEL, "--batch_size=4", "--gradient_accumulation_steps=1",
            f"--max_iters={max_iters}", "--eval_interval=1", "--eval_iters=1", "--log_interval=1",
            "--warmup_iters=0", "--lr_decay_iters=1000", "--always_save_checkpoint=True", "--plot=False",
            f"--data_dir={data}", f"--dataset={data.name}", f"--out_dir={out}", f"--init_from={init}"]


def drill_training(root: Path, data: Path, kills: int, rng: random.Random) -> Counts:
    c = Counts()
    out = root / "train_out"
    r = subprocess.run(glassgpt(*train_args(data, out, 2, "scratch")), cwd=REPO, env=env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    last = check_checkpoint(out, c)
    for i in range(kills):
        target = (last or 0) + 200
        killed, log = kill_after(glassgpt(*train_args(data, out, target, "resume")), "saved checkpoint",
                                 rng.uniform(0.0, 1.5))
        if not killed:
            c.failed_resumes += 1
            c.notes.append(f"resume {i} ended by itself: {log[-400:]}")
            continue
        c.kills += 1
        if leftovers(out):
            c.during_write += 1
        it = check_checkpoint(out, c)
        if it is not None and last is not None and it < last:
            c.corrupt += 1
            c.notes.append(f"checkpoint went back from iter {last} to {it}")
        last = it if it is not None else last
    # one last resume to its end: it must continue from the last checkpoint and clean every leftover
    r = subprocess.run(glassgpt(*train_args(data, out, (last or 0) + 2, "resume")), cwd=REPO, env=env(),
                       capture_output=True, text=True)
    after = check_checkpoint(out, c) if r.returncode == 0 else None
    if after is None or after != (last or 0) + 2:
        c.failed_resumes += 1
        c.notes.append(f"final resume: exit {r.returncode}: {r.stdout[-600:]} {r.stderr[-600:]}")
    c.leftovers = len(leftovers(out))
    if c.leftovers:
        c.notes.append(f"leftovers: {[p.name for p in leftovers(out)]}")
    return c


def stable(obj):
    """A query's JSON without its timings (query_ms, build_seconds, built_at ...), to compare answers."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items()
                if not (k.endswith(("_ms", "_seconds", "_at")) or k in ("seconds", "ms"))}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def same(out: str, reference: str) -> bool:
    try:
        return stable(json.loads(out)) == stable(json.loads(reference))
    except json.JSONDecodeError:
        return False


def query(cmd: list[str]) -> tuple[int, str, str]:
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def judge_query(cmd: list[str], reference: str, c: Counts) -> None:
    """After a kill: a query gives the reference answer, or one clean error line and exit 2."""
    code, out, err = query(cmd)
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    if code == 0 and same(out, reference):
        return
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err:
        return
    c.wrong_answers += 1
    c.notes.append(f"query after kill: exit {code}: {out[-300:]} {err[-600:]}")


def drill_build(root: Path, build: list[str], ready: str, artifact: Path, q: list[str], kills: int,
                rng: random.Random, what: str) -> Counts:
    """Kill `build` at random moments, half of them over an existing artifact (which must survive)."""
    c = Counts()
    r = subprocess.run(build, cwd=REPO, env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    code, reference, err = query(q)
    assert code == 0, err[-2000:]
    span = seconds_after(build, ready)  # how long the build runs once it has said `ready`
    i = 0
    while c.kills < kills and i < 3 * kills:
        i += 1
        over_existing = i % 2 == 1
        if not over_existing:
            shutil.rmtree(artifact, ignore_errors=True)  # the artifact only: leftovers stay for the next build
        elif query(q)[0] != 0:  # an earlier kill left none: build one whole first, to kill over it
            subprocess.run(build, cwd=REPO, env=env(), capture_output=True, text=True)
        killed, log = kill_after(build, ready, rng.uniform(0.0, span))
        if not killed:
            c.notes.append(f"{what} build {i} finished before the kill")
        c.kills += killed
        if killed and leftovers(artifact.parent):
            c.during_write += 1
        if not over_existing:
            judge_query(q, reference, c)
            continue
        code, out, err = query(q)  # the artifact that was there before the kill answers as before
        if code != 0 or not same(out, reference):
            c.corrupt += 1
            c.notes.append(f"{what}: the previous artifact did not survive the kill: {err[-400:]}")
    r = subprocess.run(build, cwd=REPO, env=env(), capture_output=True, text=True)
    code, out, err = query(q)
    if r.returncode != 0 or code != 0 or not same(out, reference):
        c.wrong_answers += 1
        c.notes.append(f"{what}: rebuild after the drill: build exit {r.returncode}, query exit {code}: "
                       f"{err[-300:]} answer {json.dumps(stable(json.loads(out)))[:300] if code == 0 else ''} "
                       f"reference {json.dumps(stable(json.loads(reference)))[:300]}")
    c.leftovers = len(leftovers(artifact.parent))
    if c.leftovers:
        c.notes.append(f"{what} leftovers: {[p.name for p in leftovers(artifact.parent)]}")
    return c


def make_data(root: Path, chars: int) -> Path:
    from tests.conftest import TINY_TEXT, make_char_dataset

    mirror = Path(os.environ.get("GLASSGPT_MIRROR", REPO.parent / "shared" / "data"))
    src = mirror / "tinyshakespeare" / "input.txt"
    text = src.read_text()[:chars] if src.exists() else (TINY_TEXT * (chars // len(TINY_TEXT) + 1))[:chars]
    return make_char_dataset(root / "data" / f"drill_{chars}", text)


def run(train: int = 14, spans: int = 4, knn: int = 4, seed: int = 0, root: Path | None = None,
        tokens: tuple[int, int] = (100_000, 1_000_000)) -> dict[str, Counts]:
    """The drill; `tokens`: the training data's and the span index's corpus sizes."""
    rng = random.Random(seed)
    root = Path(root or tempfile.mkdtemp(prefix="glassgpt-crash-"))
    print(f"crash drill in {root}; load {open('/proc/loadavg').read().split()[:3]}", flush=True)
    results: dict[str, Counts] = {}
    data = make_data(root, tokens[0])
    t0 = time.time()
    results["training"] = drill_training(root, data, train, rng)
    print(results["training"].line("training"), f"({time.time() - t0:.0f} s)", flush=True)
    big = make_data(root, tokens[1])
    t0 = time.time()
    results["span index"] = drill_build(
        root, glassgpt("trace-spans", f"--data_dir={big}", "--build"), "span index of", big / "spans",
        glassgpt("trace-spans", f"--data_dir={big}", "--text=ROMEO:\nIs the day so young?", "--json"), spans, rng,
        "span index")
    print(results["span index"].line("span index"), f"({time.time() - t0:.0f} s)", flush=True)
    out = root / "train_out"
    t0 = time.time()
    results["kNN store"] = drill_build(
        root, glassgpt("trace-knn", f"--out_dir={out}", "--device=cpu", "--build", "--stride=64"), "embedding windows",
        out / "knn_train", glassgpt("trace-knn", f"--out_dir={out}", "--device=cpu", "--text=ROMEO: I am", "--json"),
        knn, rng, "kNN store")
    print(results["kNN store"].line("kNN store"), f"({time.time() - t0:.0f} s)", flush=True)
    total = Counts()
    for r in results.values():
        for k in ("kills", "during_write", "corrupt", "failed_resumes", "wrong_answers", "leftovers", "sidecar_lag"):
            setattr(total, k, getattr(total, k) + getattr(r, k))
        total.notes += r.notes
    results["total"] = total
    print(total.line("TOTAL"))
    for n in total.notes:
        print("  note:", n)
    print(f"load after: {open('/proc/loadavg').read().split()[:3]}")
    shutil.rmtree(root, ignore_errors=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=14)
    ap.add_argument("--spans", type=int, default=4)
    ap.add_argument("--knn", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="one kill of each kind on 20k/100k-token corpora "
                    "(tests/test_crash_drill.py runs the full drill)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.train, a.spans, a.knn = 1, 1, 1
    res = run(a.train, a.spans, a.knn, a.seed, tokens=(20_000, 100_000) if a.smoke else (100_000, 1_000_000))
    t = res["total"]
    return 0 if t.corrupt == t.failed_resumes == t.wrong_answers == t.leftovers == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
