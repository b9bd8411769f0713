"""Typed configuration with nanoGPT's habits: `train.py config/x.py --batch_size=32`.

Arguments are read left to right: a bare path is a nanoGPT-style config file (`key = value` Python),
executed in a fresh namespace (never our globals); `--key=value` overrides one field, its value
parsed as a Python literal when it is one and kept as a string otherwise. Every key must name a field
of the dataclass (unknown keys are rejected with the closest valid name), and every value must have
the field's type: ints are accepted for floats, None only where the field allows it.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from glassgpt.errors import UserError
from glassgpt.sampling import SamplingSettings
from glassgpt.sourcefields import source_dataclass

C = TypeVar("C")


# The architecture options (rope, qk_norm, ...) are GPTConfig's own fields, read from glassgpt/model.py's
# source (no torch import): an option added there, with its default and docstring, is a train.py key.
# Left out: what train sets itself (the sizes, dropout, bias and activation, declared below with
# nanoGPT's defaults; vocab_size from the data) and what only extend-context sets (rope_scale).
GPTOptions: Any = source_dataclass("glassgpt.model", "GPTConfig", exclude=(
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation", "rope_scale"))


@dataclass
class TrainConfig(GPTOptions):
    """Every nanoGPT train.py key with its nanoGPT default, then glassgpt's own, then the model's
    architecture options (glassgpt.model.GPTConfig, docs/architecture.md; defaults are GPT-2's)."""

    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False
    """Evaluate once at the start and exit (config/eval_gpt2*.py)."""
    always_save_checkpoint: bool = True
    """Save at every eval; False saves only when val loss improves."""
    init_from: str = "scratch"
    """'scratch', 'resume' (from out_dir/ckpt.pt), 'gpt2*' (OpenAI weights), a local HF GPT-2 directory, or
    another run's out_dir / ckpt .pt file to finetune (its weights, iteration 0, a fresh optimizer)."""
    # wandb logging (imported only when wandb_log is True)
    wandb_log: bool = False
    wandb_project: str = "owt"
    wandb_run_name: str = "gpt2"
    # data
    dataset: str = "openwebtext"
    gradient_accumulation_steps: int = 5 * 8
    """Micro-steps per optimizer step, over the whole job (divided among DDP ranks)."""
    batch_size: int = 12
    """Sequences per micro-step per process."""
    block_size: int = 1024
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    """0 for pretraining, try 0.1+ for finetuning."""
    bias: bool = False
    """Biases in Linears and LayerNorms."""
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    # learning rate schedule
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    """Cosine decay ends here (~= max_iters per Chinchilla)."""
    min_lr: float = 6e-5
    lr_schedule: Literal["cosine", "wsd"] = "cosine"
    """'cosine' (nanoGPT's) or 'wsd' (warmup, flat, linear decay to min_lr over the last decay_frac)."""
    decay_frac: float = 0.2
    """wsd only: the share of lr_decay_iters spent decaying."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """'adamw' (nanoGPT's) or 'muon' (torch.optim.Muon, as optim.GroupedMuon, for the blocks' 2-D
    matrices, AdamW at learning_rate for embeddings, head, gains and biases; glassgpt/optim.py)."""
    muon_lr: float = 0.02
    """Muon's peak learning rate (the schedule scales it like learning_rate)."""
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    # system
    backend: str = "nccl"
    """torch.distributed backend for DDP: 'nccl' on GPUs, 'gloo' on CPUs."""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:1', 'mps', or 'auto' (cuda > mps > cpu)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """'float32', 'bfloat16' or 'float16' (GradScaler); 'auto' = bfloat16 where supported on CUDA, else
    float16 on CUDA, float32 elsewhere. On a CPU 'bfloat16' autocasts the matmuls (fast with AMX /
    AVX512-BF16), 'float16' is float32."""
    compile: bool = True
    """torch.compile the model (PyTorch 2.0+)."""
    # glassgpt
    seed: int = 1337
    data_dir: str | None = None
    """Prepared data directory; default data/<dataset>."""
    vocab_dir: str | None = None
    """Directory with GPT-2's encoder.json + vocab.bpe when offline (else GLASSGPT_MIRROR / tiktoken)."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Multi-process strategy under torchrun: 'ddp' or 'fsdp' (sharded parameters)."""
    plot: bool = True
    """Write out_dir/loss.png at the end."""
    activation: Literal["gelu", "gelu_new", "relu2"] | None = None
    """Override the MLP activation ('gelu', 'gelu_new' or 'relu2'); None keeps the checkpoint's / 'gelu'."""
    threads: int | None = None
    """CPU threads for torch; None: $OMP_NUM_THREADS if set, else for models under 30M parameters the
    cores other processes leave idle (runtime.choose_threads)."""
    # checkpoints kept, batch ramp, health (docs/training.md)
    keep_every: int = 0
    """Also keep the weights every N iterations as out_dir/ckpt-<iter>.pt (0: off); commands open one
    with --ckpt_iter=N (glassgpt/kept.py)."""
    batch_ramp_start: int = 0
    """Tokens per optimizer step at iteration 0, growing linearly to the configured batch
    (gradient_accumulation_steps x batch_size x block_size) by batch_ramp_iters; 0: no ramp
    (glassgpt/schedule.py)."""
    batch_ramp_iters: int = 0
    health: bool = True
    """Log per-layer activation and weight norms at log iterations and plot out_dir/health.png
    (glassgpt/health.py)."""


@dataclass
class SampleConfig(SamplingSettings):
    """nanoGPT sample.py's keys, plus glassgpt's engine controls; the sampling settings
    (max_new_tokens, temperature, top_k, top_p, seed, window_rule) are glassgpt.sampling's block,
    shared with every command that generates."""

    init_from: str = "resume"
    """'resume' (from out_dir) or a GPT-2 variant / local HF directory."""
    out_dir: str = "out"
    start: str = "\n"
    """Prompt text, or FILE:path to read it from a file."""
    num_samples: int = 10
    max_new_tokens: int = 500
    """Tokens to generate (nanoGPT's sample.py default)."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = False
    stop: str | None = None
    """Stop a sample when this string appears (it is kept)."""
    stream: bool = True
    """Print tokens as they are produced (single sample)."""
    interactive: bool = False
    """Keep the model loaded and read prompts from stdin, one per line, until EOF (an empty line
    reuses --start)."""
    copying: bool = True
    """Under each sample, the share of it found verbatim in the training data and its longest copied
    span with its source line, when the run's data has a span index (glassgpt/copying.py)."""
    vocab_dir: str | None = None
    """Directory with GPT-2's encoder.json + vocab.bpe when offline."""
    data_dir: str | None = None
    """Dataset directory whose meta.json / meta.pkl holds the tokenizer, when the checkpoint lacks it
    (nanoGPT checkpoints: default data/<dataset>)."""
    threads: int | None = None
    """CPU threads for torch; None: $OMP_NUM_THREADS if set, else for models under 30M parameters the
    cores other processes leave idle (runtime.choose_threads)."""


@dataclass
class BenchConfig:
    """nanoGPT bench.py's keys."""

    batch_size: int = 12
    block_size: int = 1024
    bias: bool = False
    real_data: bool = True
    dataset: str = "openwebtext"
    data_dir: str | None = None
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    seed: int = 1337
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    compile: bool = True
    profile: bool = False
    """Write a torch profiler trace to bench_log/ instead of timing."""
    num_steps: int = 20
    """Timed steps (after 10 warm-up steps)."""


@dataclass(frozen=True)
class Range:
    """A closed or half-open numeric interval a config value must lie in; None = unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""
    """What to do instead, when the obvious fix is not just 'pick a value in range'."""
    none_hint: str = ""
    """Said instead of `hint` where the field also allows None."""

    def contains(self, v: float) -> bool:
        if v != v:  # NaN is in no range
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def describe(self, key: str) -> str:
        lo = f"{self.lo} {'<' if self.lo_open else '<='} " if self.lo is not None else ""
        hi = f" {'<' if self.hi_open else '<='} {self.hi}" if self.hi is not None else ""
        if lo and not hi:
            return f"{key} {'>' if self.lo_open else '>='} {self.lo}"
        return f"{lo}{key}{hi}"


AT_LEAST_1, AT_LEAST_0 = Range(lo=1), Range(lo=0)
# Valid values by field NAME, for every config class: a field named `batch_size` means the same thing
# in training, eval and tracing, so its range is written once. None (where a field allows it) means
# "default/off" and is never range-checked. Keep field names consistent with this table.
RANGES: dict[str, Range] = {
    **dict.fromkeys([
        "gradient_accumulation_steps", "batch_size", "block_size", "eval_interval", "log_interval",
        "eval_iters", "n_layer", "n_head", "n_embd", "num_samples", "max_new_tokens", "k", "stride",
        "query_stride", "num_steps", "baseline_windows", "max_sources", "keep", "top", "threads",
        "num_proc", "ef_search", "nprobe", "batch_chars", "max_windows", "max_tokens", "mc_limit",
        "coverage_n", "min_len", "n_neurons"], AT_LEAST_1),
    **dict.fromkeys([
        "max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "grad_clip", "min_lr", "window",
        "context", "n_random", "show_chars", "min_words", "seed", "floor", "n_controls", "keep_every",
        "batch_ramp_start", "batch_ramp_iters"], AT_LEAST_0),
    "top_k": Range(lo=1, none_hint="use --top_k=None to sample from every token"),
    "temperature": Range(lo=0, hint="0 is greedy decoding"),
    "top_p": Range(lo=0, hi=1, lo_open=True),
    "learning_rate": Range(lo=0, lo_open=True),
    "dropout": Range(lo=0, hi=1, hi_open=True),
    "beta1": Range(lo=0, hi=1, hi_open=True),
    "beta2": Range(lo=0, hi=1, hi_open=True),
    "val_fraction": Range(lo=0, hi=1, hi_open=True),
    "density": Range(lo=0, hi=1, lo_open=True),
}


def check_range(key: str, value: Any, where: str, nullable: bool = False) -> None:
    """Raise one UserError line naming the key, the value and its valid range if `value` is outside
    RANGES[key]; None, non-numbers and keys without a range pass. `nullable`: the field allows None."""
    r = RANGES.get(key)
    if r is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not r.contains(value):
        hint = (r.none_hint if nullable else "") or r.hint
        raise UserError(f"{where}: {key}={value!r} is out of range: use {r.describe(key)}"
                        + (f"; {hint}" if hint else ""))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def choices(tp: Any) -> tuple[Any, ...]:
    """The values a `Literal[...]` field annotation allows (also inside `Literal[...] | None`); () for
    any other type."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(v for a in typing.get_args(tp) for v in choices(a))
    return ()


def field_choices(cls: type, name: str) -> tuple[Any, ...]:
    """The choices of a config field declared `Literal[...]` (e.g. to loop over every ranking)."""
    return choices(_field_types(cls)[name])


def _allowed(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(concrete types, allows None) for a field annotation like `int | None` (a Literal's values
    count as their types: `Literal['a', 'b']` is a str)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        kinds = tuple(k for a in args if a is not type(None) for k in _allowed(a)[0])
        return tuple(dict.fromkeys(kinds)), type(None) in args
    if origin is Literal:
        return tuple(dict.fromkeys(type(v) for v in typing.get_args(tp))), False
    return (tp,), False


def check_choice(key: str, value: Any, tp: Any, where: str) -> None:
    """Raise one UserError line when a Literal-typed field gets a value outside its choices (the one
    check for every command's choices: declare them as `Literal[...]` on the config field)."""
    allowed = choices(tp)
    if allowed and value is not None and value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
        raise UserError(f"{where}: {key}={value!r} is not one of {', '.join(map(str, allowed))}"
                        + (f"; did you mean {close[0]}?" if close else ""))


def coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the field type, widening int -> float; raise UserError otherwise."""
    kinds, nullable = _allowed(tp)
    if value is None:
        if nullable:
            return None
        raise UserError(f"{where}: {key} cannot be None")
    for k in kinds:
        if k is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if k is bool and isinstance(value, bool):
            return value
        if k is not bool and isinstance(value, k) and not (k is int and isinstance(value, bool)):
            return value
    names = " or ".join(k.__name__ for k in kinds) + (" or None" if nullable else "")
    raise UserError(f"{where}: {key} must be {names}, got {type(value).__name__} {value!r}")


def _reject_unknown(key: str, valid: list[str], where: str) -> None:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise UserError(f"{where}: unknown config key {key!r}{hint}")


def read_config_file(path: str) -> dict[str, Any]:
    """Execute a nanoGPT-style config file in a fresh namespace and return its public values."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    ns: dict[str, Any] = {}
    try:
        exec(compile(p.read_text(), str(p), "exec"), ns)
    except Exception as e:
        raise UserError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    return {
        k: v for k, v in ns.items()
        if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))
    }


def parse_value(text: str) -> Any:
    """`--k=v`: a Python literal when v is one (3, 1e-3, True, None, 'x'), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_config(cls: type[C], argv: list[str] | None = None, base: C | None = None) -> C:
    """Build a `cls` dataclass from config files and --key=value overrides, nanoGPT style."""
    cfg = dataclasses.replace(base) if base is not None else cls()  # type: ignore[type-var]
    hints = _field_types(cls)
    valid = list(hints)
    set_by: dict[str, str] = {}  # key -> where its final value came from, for the range check
    for arg in argv or []:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            key = key.replace("-", "_")
            where = f"argument {arg}"
            if key not in hints:
                _reject_unknown(key, valid, where)
            if not eq:
                # `--flag` alone means True for booleans, as most CLIs do
                if bool in _allowed(hints[key])[0]:
                    raw = "True"
                else:
                    raise UserError(f"{where}: give a value, as --{key}=VALUE")
            value = parse_value(raw)
            if str in _allowed(hints[key])[0] and not isinstance(value, str) and value is not None:
                value = raw  # e.g. --start=123 or --out_dir=2024 stay strings
            setattr(cfg, key, coerce(key, value, hints[key], where))
            check_choice(key, getattr(cfg, key), hints[key], where)
            set_by[key] = where
        else:
            for key, value in read_config_file(arg).items():
                if key not in hints:
                    _reject_unknown(key, valid, f"config file {arg}")
                setattr(cfg, key, coerce(key, value, hints[key], f"config file {arg}"))
                check_choice(key, getattr(cfg, key), hints[key], f"config file {arg}")
                set_by[key] = f"config file {arg}"
    # Only values the user set are checked: a default outside the table (extend-context's
    # block_size=0, "required") is the command's own sentinel, explained by the command.
    for key, where in set_by.items():
        check_range(key, getattr(cfg, key), where, nullable=_allowed(hints[key])[1])
    return cfg


def read_text_arg(value: str, key: str = "text") -> str:
    """A text-valued option: `FILE:path` reads the file (nanoGPT's --start convention), anything else
    is the text itself."""
    if value.startswith("FILE:"):
        path = Path(value[len("FILE:"):])
        if not path.is_file():
            raise UserError(f"--{key}={value}: {path} does not exist")
        return path.read_text(encoding="utf-8")
    return value


def json_or_text_main(cls: type[C], argv: list[str] | None, command: str, run: Any, render: Any) -> Any:
    """A trace command's main: --help, load the config, `run(cfg)`, print the result as JSON (--json) or
    as `render(result, cfg.show_chars)`, return it."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if wants_help(cls, argv, command):
        return None
    cfg: Any = load_config(cls, argv)
    result = run(cfg)
    if result is not None:
        print(json.dumps(result, indent=1, ensure_ascii=False) if cfg.json else render(result, cfg.show_chars))
    return result


def wants_help(cls: type, argv: list[str] | None, prog: str, extra: str = "") -> bool:
    """If -h/--help is among the arguments, print the keys of `cls` (with `extra` after) and say so."""
    if not any(a in ("-h", "--help") for a in argv or []):
        return False
    print(help_text(cls, prog) + extra)
    return True


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field (for --help), read from the source."""
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def help_text(cls: type, prog: str) -> str:
    """The keys of a config class with their defaults, docstrings and choices: the class's own keys
    first, then those of the blocks it mixes in."""
    from glassgpt.sourcefields import help_line

    docs: dict[str, str] = {}
    for c in reversed(cls.__mro__):  # a mixed-in settings block documents its own fields
        if dataclasses.is_dataclass(c):
            docs.update(c.__dict__.get("__field_docs__") or field_docs(c))
    hints, own = _field_types(cls), cls.__dict__.get("__annotations__", {})
    fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)  # stable: own keys first
    lines = [f"usage: {prog} [config_file.py ...] [--key=value ...]", "", "keys (default):"]
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else None
        lines.append(help_line(f.name, default, docs.get(f.name, ""), choices(hints[f.name])))
    return "\n".join(lines)


__all__ = ["TrainConfig", "SampleConfig", "BenchConfig", "RANGES", "Range", "check_range", "check_choice", "choices",
           "field_choices", "load_config", "config_to_dict", "help_text", "read_text_arg", "wants_help",
           "GPTOptions"]
