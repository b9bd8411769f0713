"""The README's "Your own text, end to end" recipe, run as written on a .txt this test writes: the
five lines are read from README.md, and only tiny iteration overrides are appended (the config file
is found in this checkout). The viewer is started as a user would, and its page is fetched."""

from __future__ import annotations

import random
import re
import shlex
import subprocess
import sys
import time
import urllib.request

from conftest import REPO, TINY_TEXT

from glassgpt.cli import main as cli_main

TINY = {
    "train": ["--max_iters=4", "--lr_decay_iters=4", "--warmup_iters=1", "--eval_iters=1", "--batch_size=4",
              "--threads=1", "--plot=False"],
    "sample": ["--max_new_tokens=12"],
    "trace-spans": ["--max_new_tokens=12"],
}


def recipe() -> list[list[str]]:
    """The five command lines of the README's second section."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.M)
    assert sections[1].startswith("Quick start") and sections[2].startswith("Your own text"), "section order"
    block = re.search(r"```bash\n(.*?)```", sections[2], re.S)
    assert block is not None
    lines = [shlex.split(line) for line in block.group(1).strip().splitlines()]
    assert len(lines) == 5 and all(line[0] == "glassgpt" for line in lines)
    assert [line[1] for line in lines] == ["prepare", "train", "sample", "trace-spans", "view"]
    assert not any("GLASSGPT_" in " ".join(line) for line in lines)  # no variable the user must set
    return [line[1:] for line in lines]


def test_readme_recipe_runs_verbatim_on_a_text_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    words = TINY_TEXT.split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    (tmp_path / "my.txt").write_text(TINY_TEXT + "\n".join(lines) + "\nThe end.\n", encoding="utf-8")
    *batch, view = recipe()
    for argv in batch:
        argv = [str(REPO / a) if a.startswith("config/") else a for a in argv] + TINY.get(argv[0], [])
        assert cli_main(argv) == 0, argv
    out = capsys.readouterr().out
    assert "train on it: glassgpt train --data_dir=data/mine" in out
    assert re.search(r"data: [\d,]+ tokens\. For this (CPU|GPU) try --n_layer=\d+", out), "prepare's size advice"
    assert (tmp_path / "data" / "mine" / "tokenizer.json").exists() and (tmp_path / "out-mine" / "ckpt.pt").exists()
    assert "coverage" in out  # trace-spans traced its sample
    assert cli_main(["sample", "--out_dir=out-mine", "--max_new_tokens=12"]) == 0
    assert "copying: " in capsys.readouterr().out  # the index now exists: the copying line is on
    proc = subprocess.Popen([sys.executable, "-m", "glassgpt.cli", *view, "--port=0", "--no_browser=True"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    try:
        deadline, url = time.time() + 120, None
        assert proc.stdout is not None
        while url is None and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the viewer exited"
            m = re.search(r"(http://127\.0\.0\.1:\d+/)", line)
            url = m.group(1) if m else None
        assert url, "the viewer printed no address"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
