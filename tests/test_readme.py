"""The README's commands run, so a renamed flag or a removed command breaks CI, not a user.

Every line of every ```bash / ```sh block of README.md is a command (a trailing `\\` joins lines,
`#` starts a comment, `a && b` is two commands). They run in order, in one temporary directory that
holds copies of the thin scripts' data folders (`data/<name>/prepare.py` writes beside itself), each
in-process (`python X.py` via runpy, `glassgpt ...` via glassgpt.cli.main, `python -m M` via
runpy), and each must exit 0. To keep it to seconds the commands are rewritten mechanically, by the
rule for their program in RULES:

- placeholders become fixtures: `../shared/data` a tiny mirror (a 30-document English corpus, GPT-2's
  vocabulary files), `path/to/hf_gpt2_dir` a tiny random Hugging Face GPT-2, `FILE:name.txt` a file
  holding a line of the play;
- preparation reads the first 12,000 characters of tiny-shakespeare (`--input=...`);
- training runs 2 iterations (4 when resuming) with eval_iters=1, on CPU without compile, and a
  2-layer 32-wide model with batches of 4 where the command line does not set these itself (a resumed
  run keeps its model and takes only the batch);
- generation makes 16 new tokens (`--max_new_tokens=16`); `--interactive` reads one prompt from stdin;
  trace-neurons' baseline is 8 generated windows, not 128.

Commands that need a network, the Hugging Face hub, several GPUs, a nanoGPT checkout, or that start a
server or the whole test suite are in SKIP with the reason. A command with neither a rule nor a skip
fails `test_every_readme_command_has_a_rule`: add its rule (usually `as_is`) when you add it to the README.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
TINY_CHARS = 12_000
PROMPT = "ROMEO:\nIs the day so young?\n"


@dataclass
class Command:
    line: int  # in README.md
    text: str  # as the README has it (one command of an `&&` chain)

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def env(self) -> dict[str, str]:
        env = {}
        for w in self.words:
            if not re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w):
                break
            k, v = w.split("=", 1)
            env[k] = v
        return env

    @property
    def argv(self) -> list[str]:
        return self.words[len(self.env):]

    @property
    def program(self) -> str:
        """What RULES and SKIP are keyed by: `python train.py`, `python -m benchmarks.x`, `glassgpt trace-knn`,
        `glassgpt prepare corpus`, `make demo`, `pip install`."""
        a = self.argv
        if a[0] == "python" and a[1] == "-m":
            return " ".join(a[:3])
        if a[0] == "glassgpt" and a[1:2] == ["prepare"]:
            return " ".join(a[:3])
        return " ".join(a[:2])


def readme_commands(path: Path = README) -> list[Command]:
    """Every command of the ```bash and ```sh blocks, in order, with its line number."""
    out: list[Command] = []
    in_block, pending, start = False, "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("```"):
            in_block = not in_block and stripped[3:].strip() in ("bash", "sh")
            continue
        if not in_block:
            continue
        if not pending:
            start = n
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()  # no README command has a `#` inside quotes
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text, pending = (pending + line).strip(), ""
        out += [Command(start, part.strip()) for part in text.split(" && ") if part.strip()]
    return out


# ---------------------------------------------------------------- rules

SKIP: dict[str, str] = {
    "make demo": "sets up .venv and trains for minutes; .ci/run runs `make test`, which sets up the same way",
    "make test": "is the test suite this test is part of",
    "make lint": "runs ruff and mypy over the package; `make test` runs it before the suite",
    "python -m pytest": "is the test suite this test is part of",
    "pip install": "installs from a package index (network)",
    "torchrun --standalone": "needs several GPUs; tests/test_distributed.py runs DDP/FSDP on CPU processes",
    "python data/openwebtext/prepare.py": "downloads a Hugging Face dataset (network)",
    "glassgpt view": "starts a server that runs until stopped; tests/test_view.py and test_view_browser.py drive it",
    "python -m benchmarks.bench_record": "needs a nanoGPT checkout; tests/test_benchmarks_smoke.py runs --smoke",
}
# commands skipped for what one of their arguments needs (the rest of that program's commands run)
SKIP_IF: list[tuple[str, str]] = [
    ("config/eval_gpt2.py", "downloads OpenAI's gpt2 from the Hugging Face hub (network)"),
    ("--init_from=gpt2", "downloads OpenAI's gpt2 from the Hugging Face hub (network)"),
]

TRAIN_SIZE = {"n_layer": "2", "n_head": "2", "n_embd": "32", "block_size": "32", "batch_size": "4",
              "gradient_accumulation_steps": "1"}


def _keys(args: list[str]) -> set[str]:
    return {a[2:].split("=", 1)[0] for a in args if a.startswith("--")}


def as_is(args: list[str], fx: Fixture) -> list[str]:
    return args


def tiny_train(args: list[str], fx: Fixture) -> list[str]:
    resume = "--init_from=resume" in args
    iters = 4 if resume else 2
    extra = [f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={iters}", "--eval_iters=1",
             "--warmup_iters=0", "--log_interval=1", "--device=cpu", "--compile=False"]
    have = _keys(args)  # a resumed model keeps its architecture: only the batch shrinks
    extra += [f"--{k}={v}" for k, v in TRAIN_SIZE.items()
              if k not in have and not (resume and k not in ("batch_size", "gradient_accumulation_steps"))]
    return args + extra


def tiny_prepare(args: list[str], fx: Fixture) -> list[str]:
    return args + [f"--input={fx.tiny_text}"]


def tiny_generation(args: list[str], fx: Fixture) -> list[str]:
    return args + ["--max_new_tokens=16"]


def tiny_generation_if_prompted(args: list[str], fx: Fixture) -> list[str]:
    return tiny_generation(args, fx) if any(a.startswith(("--start=", "--interactive")) for a in args) else args


def tiny_neurons(args: list[str], fx: Fixture) -> list[str]:
    return tiny_generation_if_prompted(args, fx) + ["--baseline_windows=8"]


RULES: dict[str, Callable[[list[str], Fixture], list[str]]] = {
    "python train.py": tiny_train,
    "glassgpt train": tiny_train,
    "python sample.py": tiny_generation,
    "glassgpt sample": tiny_generation,
    "python data/shakespeare_char/prepare.py": tiny_prepare,
    "python data/shakespeare/prepare.py": tiny_prepare,
    "glassgpt prepare shakespeare_char": tiny_prepare,
    "glassgpt prepare shakespeare": tiny_prepare,
    "glassgpt prepare corpus": as_is,  # its --input is ../shared/data/..., the tiny mirror
    "glassgpt prepare my.txt": tiny_prepare,  # "Your own text": the last --input wins over the path
    "glassgpt trace-spans": tiny_generation_if_prompted,
    "glassgpt trace-knn": tiny_generation_if_prompted,
    "glassgpt trace-influence": tiny_generation_if_prompted,
    "glassgpt trace-neurons": tiny_neurons,
    "glassgpt neuron": as_is,
    "glassgpt extend-context": as_is,
    "glassgpt export": as_is,
    "glassgpt eval": as_is,
    "glassgpt report": tiny_generation_if_prompted,
}


def skip_reason(cmd: Command) -> str | None:
    for prefix, why in SKIP.items():
        if " ".join(cmd.argv).startswith(prefix):
            return why
    for needle, why in SKIP_IF:
        if needle in cmd.argv:
            return why
    return None


# ---------------------------------------------------------------- fixtures and running


@dataclass
class Fixture:
    root: Path  # the working directory
    mirror: Path  # the tiny mirror that ../shared/data becomes
    tiny_text: Path
    hf_dir: Path


def make_fixture(root: Path, real_mirror: Path) -> Fixture:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config").symlink_to(REPO / "config")  # `python train.py config/x.py` reads it from the working directory
    for script in (REPO / "data").glob("*/prepare.py"):
        (root / script.parent.relative_to(REPO)).mkdir(parents=True, exist_ok=True)
        shutil.copy(script, root / script.relative_to(REPO))
    mirror = root / "tiny_mirror"
    (mirror / "english").mkdir(parents=True)
    lines = (real_mirror / "english" / "sotu_mobydick.jsonl").read_text().splitlines()
    (mirror / "english" / "sotu_mobydick.jsonl").write_text("\n".join(lines[:30]) + "\n")
    (mirror / "gpt2").symlink_to(real_mirror / "gpt2")
    tiny_text = root / "tiny_shakespeare.txt"
    tiny_text.write_text((real_mirror / "tinyshakespeare" / "input.txt").read_text()[:TINY_CHARS])
    for name in ("my.txt", "prompt.txt"):
        (root / name).write_text(PROMPT)
    from tests.test_pretrained import make_hf_model, save_hf

    hf_dir = save_hf(make_hf_model(2, 2, 32, 64, 50257, "gelu_new"), root / "tiny_hf_gpt2")
    return Fixture(root, mirror, tiny_text, hf_dir)


def rewrite(cmd: Command, fx: Fixture) -> tuple[dict[str, str], list[str]]:
    """(environment, argv) to run, by the rules in the module docstring."""
    subst = {"../shared/data": str(fx.mirror), "path/to/hf_gpt2_dir": str(fx.hf_dir)}

    def fill(s: str) -> str:
        for k, v in subst.items():
            s = s.replace(k, v)
        return s

    env = {k: fill(v) for k, v in cmd.env.items()}
    argv = [fill(a) for a in cmd.argv]
    n = len(cmd.program.split())
    return env, argv[:n] + RULES[cmd.program](argv[n:], fx)


def run_in_process(argv: list[str], env: dict[str, str], root: Path, stdin: str = "") -> int:
    """argv as its program would run it, in this process: exit status (SystemExit's code, or 0)."""
    old_argv, old_env, old_stdin = sys.argv[:], os.environ.copy(), sys.stdin
    os.environ.update(env)
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.chdir(root) if hasattr(contextlib, "chdir") else _chdir(root):
            if argv[0] == "glassgpt":
                from glassgpt import cli

                return int(cli.main(argv[1:]) or 0)
            if argv[:2] == ["python", "-m"]:
                sys.argv = [argv[2], *argv[3:]]
                runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
                return 0
            if argv[0] == "python":
                script = root / argv[1] if (root / argv[1]).exists() else REPO / argv[1]
                sys.argv = [str(script), *argv[2:]]
                runpy.run_path(str(script), run_name="__main__")
                return 0
            raise AssertionError(f"no way to run {argv[0]!r} in-process; add it to run_in_process")
    except SystemExit as e:
        return 0 if e.code is None else (e.code if isinstance(e.code, int) else 1)
    finally:
        sys.argv, sys.stdin = old_argv, old_stdin
        os.environ.clear()
        os.environ.update(old_env)


@contextlib.contextmanager
def _chdir(path: Path):  # contextlib.chdir is Python 3.11+
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# ---------------------------------------------------------------- tests


def test_readme_parser_finds_the_commands():
    cmds = readme_commands()
    programs = {c.program for c in cmds}
    assert len(cmds) >= 20 and {"python train.py", "glassgpt trace-spans", "make demo"} <= programs, programs
    chain = [c for c in cmds if c.text.startswith("glassgpt trace-spans --out_dir=out-shakespeare-char")]
    assert len(chain) >= 2, "the `--build && query` line is two commands"
    assert all("#" not in c.text for c in cmds)


def test_every_readme_command_has_a_rule():
    """A new README command needs a line in RULES (how to run it small) or in SKIP (why it cannot run here)."""
    missing = [f"README.md:{c.line}: {c.text}  (program {c.program!r})" for c in readme_commands()
               if skip_reason(c) is None and c.program not in RULES]
    assert not missing, ("no fixture rule for these README commands; add their program to RULES (or SKIP, with "
                         "the reason) in tests/test_readme.py:\n" + "\n".join(missing))


def test_readme_commands_run(tmp_path, mirror, capsys):
    """Each README command that is not skipped runs on the tiny fixture and exits 0."""
    fx = make_fixture(tmp_path / "work", mirror)
    ran, skipped = [], []
    for cmd in readme_commands():
        why = skip_reason(cmd)
        if why is not None:
            skipped.append(f"README.md:{cmd.line} {cmd.program}: {why}")
            continue
        env, argv = rewrite(cmd, fx)
        t0 = time.perf_counter()
        code = run_in_process(argv, env, fx.root, stdin=PROMPT if "--interactive" in argv else "")
        out, err = capsys.readouterr()
        ran.append(f"{time.perf_counter() - t0:5.1f} s  README.md:{cmd.line}  {cmd.text[:90]}")
        assert code == 0, (f"README.md:{cmd.line}: `{cmd.text}` exited {code}\nrun as: {shlex.join(argv)} "
                           f"(env {env})\nstdout tail: {out[-1500:]}\nstderr tail: {err[-1500:]}")
    with capsys.disabled():
        print("\n" + "\n".join(ran) + "\nskipped:\n" + "\n".join(skipped))
    assert len(ran) >= 15, ran


# flags the docs name that belong to other programs (torchrun), or are there on purpose
NOT_OURS = {"standalone", "nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_backend",
            "rdzv_endpoint", "rdzv_id", "no", "help",  # torchrun's and argparse's
            "lerning_rate",  # README's example of a typo that gets "did you mean learning_rate?"
            "key"}  # CONTRIBUTING's `--key=value`


def test_every_flag_the_docs_name_exists():
    """Each `--name` in README.md, CONTRIBUTING.md and docs/*.md is a field of one of glassgpt's config
    dataclasses or a benchmark's flag: a renamed option cannot survive in prose either."""
    import dataclasses
    import importlib
    import pkgutil

    import glassgpt

    fields: set[str] = set()
    for m in pkgutil.walk_packages(glassgpt.__path__, "glassgpt."):
        for v in vars(importlib.import_module(m.name)).values():
            if isinstance(v, type) and dataclasses.is_dataclass(v):
                fields |= {f.name for f in dataclasses.fields(v)}
    for p in (REPO / "benchmarks").glob("*.py"):
        src = p.read_text()
        fields |= set(re.findall(r'add_argument\("--(\w+)"', src)) | set(re.findall(r"^    (\w+): ", src, re.M))
    unknown = []
    for doc in [README, REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]:
        for n, line in enumerate(doc.read_text().splitlines(), 1):
            flags = re.findall(r"(?<![\w-])--([a-z_][a-z0-9_]*)", line)
            unknown += [f"{doc.relative_to(REPO)}:{n}: --{f}" for f in flags if f not in fields and f not in NOT_OURS]
    assert not unknown, "options the docs name that no command has:\n" + "\n".join(unknown)
