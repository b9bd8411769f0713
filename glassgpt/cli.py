"""The `glassgpt` command: one subcommand per job, each calling the same `main(argv)` as the scripts.

    glassgpt prepare shakespeare_char          # = python data/shakespeare_char/prepare.py
    glassgpt train config/train_shakespeare_char.py --device=cpu
    glassgpt sample --out_dir=out-shakespeare-char
    glassgpt trace-spans --out_dir=out-shakespeare-char --start="ROMEO:"

Arguments after the subcommand are nanoGPT-style: config files and --key=value overrides.
"""

from __future__ import annotations

import importlib
import os
import sys

from glassgpt.errors import run_main

# subcommand -> (module, one-line description). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("glassgpt.prepare", "prepare a dataset: shakespeare_char, shakespeare, or any text/JSONL/HF corpus"),
    "train": ("glassgpt.train", "train or finetune a GPT (nanoGPT's train.py)"),
    "sample": ("glassgpt.sample", "generate text from a checkpoint (nanoGPT's sample.py)"),
    "bench": ("glassgpt.bench", "time training steps: ms/iter, tokens/s, MFU (nanoGPT's bench.py)"),
    "eval": ("glassgpt.evaluate", "zero-shot perplexity / bits per byte and multiple-choice accuracy"),
    "export": ("glassgpt.export", "export a checkpoint to a Hugging Face GPT-2 directory"),
    "trace-knn": ("glassgpt.trace.knn", "nearest training windows to prompt+output (BM25 by default, or embeddings)"),
    "trace-spans": ("glassgpt.trace.spans", "verbatim spans of the output found in the training data"),
    "trace-neurons": ("glassgpt.trace.neurons", "MLP neurons that fire for a generation, contrasted and ablated"),
    "trace-influence": ("glassgpt.trace.influence_cli", "training windows that taught a generation (EK-FAC influence)"),
    "neuron": ("glassgpt.trace.neuron_card", "top-activating training windows of one neuron"),
    "extend-context": ("glassgpt.extend", "grow a checkpoint's context length (learned position embeddings)"),
    "view": ("glassgpt.view.server", "a local web page: a generation with its spans, nearest windows and neurons"),
    "report": ("glassgpt.view.report", "the viewer's page for one generation as one self-contained HTML file"),
}


# subcommand -> (module, config class, extra help text) for `--help` read from source: these modules
# import torch at the top, and printing their keys should not wait for it (sourcefields.help_from_source).
HELP_FROM_SOURCE: dict[str, tuple[str, str, str]] = {
    "train": ("glassgpt.config", "TrainConfig", ""),
    "sample": ("glassgpt.config", "SampleConfig", ""),
    "bench": ("glassgpt.config", "BenchConfig", ""),
    "eval": ("glassgpt.evaluate", "EvalConfig", ""),
    "export": ("glassgpt.export", "ExportConfig", "\n\nexample: glassgpt export --out_dir=out --to=hf hf_out/"),
    "trace-knn": ("glassgpt.trace.knn", "TraceKnnConfig", ""),
    "trace-spans": ("glassgpt.trace.spans", "TraceSpansConfig", ""),
    "trace-neurons": ("glassgpt.trace.neurons", "TraceNeuronsConfig", ""),
    "trace-influence": ("glassgpt.trace.influence_cli", "TraceInfluenceConfig", ""),
    "neuron": ("glassgpt.trace.neuron_card", "NeuronConfig", ""),
    "extend-context": ("glassgpt.extend", "ExtendConfig", ""),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: glassgpt <command> [config.py ...] [--key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`glassgpt <command> --help` lists a command's keys."]
    return "\n".join(lines)


def resolve(command: str):
    target, _ = COMMANDS[command]
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr or "main")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"error: unknown command {command!r}" + (f"; did you mean {close[0]}?" if close else "")
              + "; run `glassgpt --help`", file=sys.stderr)
        return 2
    if command in HELP_FROM_SOURCE and any(a in ("-h", "--help") for a in rest):
        module, cls, extra = HELP_FROM_SOURCE[command]
        from glassgpt.sourcefields import help_from_source

        print(help_from_source(module, cls, f"glassgpt {command}") + extra)
        return 0
    code = run_main(resolve(command), rest)
    if "RANK" in os.environ:  # a torchrun worker; glassgpt.distributed imports torch, so only here
        from glassgpt.distributed import finish_process

        return finish_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
