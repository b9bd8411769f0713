"""The `glassgpt` command starts fast: help and span queries over prepared data never import torch.

Each check runs the CLI in a fresh interpreter (the test process has torch loaded already) and asks
that interpreter, after the command, whether torch is in sys.modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from glassgpt import cli
from glassgpt.config import help_text
from tests.conftest import make_char_dataset

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
from glassgpt import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}), file=sys.stderr)
"""


def run_probe(argv: list[str], cwd: Path = REPO) -> tuple[int, bool, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=120)
    last = json.loads(r.stderr.strip().splitlines()[-1])
    return last["code"], last["torch"], r.stdout


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in cli.COMMANDS] + [["prepare", "corpus", "--help"]],
                         ids=lambda a: " ".join(a))
def test_help_does_not_import_torch(argv):
    code, torch_loaded, out = run_probe(argv)
    assert code == 0
    assert "usage" in out
    assert not torch_loaded, f"glassgpt {' '.join(argv)} imported torch"


def test_help_from_source_matches_the_classes_help():
    """`glassgpt CMD --help` reads the keys from source; it must say what the class's help says."""
    from glassgpt.sourcefields import help_from_source

    for name, (module, cls_name, _) in cli.HELP_FROM_SOURCE.items():
        import importlib

        cls = getattr(importlib.import_module(module), cls_name)
        assert help_from_source(module, cls_name, f"glassgpt {name}") == help_text(cls, f"glassgpt {name}"), name


def test_help_lists_the_choices_of_every_literal_field():
    """Every `Literal[...]` field of every command's config shows its choices in `--help`."""
    import importlib
    import typing

    from glassgpt.config import choices
    from glassgpt.sourcefields import help_from_source

    seen = 0
    for name, (module, cls_name, _) in cli.HELP_FROM_SOURCE.items():
        cls = getattr(importlib.import_module(module), cls_name)
        lines = help_from_source(module, cls_name, f"glassgpt {name}").splitlines()
        for key, tp in typing.get_type_hints(cls).items():
            if choices(tp):
                line = next(line for line in lines if line.startswith(f"  --{key}="))
                assert line.endswith(f"[one of: {', '.join(map(str, choices(tp)))}]"), (name, line)
                seen += 1
    assert seen >= 20, seen


def test_span_query_over_prepared_data_does_not_import_torch(tmp_path):
    data = make_char_dataset(tmp_path / "data" / "tiny_char")
    assert cli.main(["trace-spans", f"--data_dir={data}", "--build"]) == 0
    code, torch_loaded, out = run_probe(["trace-spans", f"--data_dir={data}", "--text=First Citizen:\nBefore we",
                                         "--json"], cwd=tmp_path)
    assert code == 0
    assert json.loads(out)["spans"], out[:500]
    assert not torch_loaded, "a span query over prepared data imported torch"


def test_unknown_command_is_one_line(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean train?" in err
