"""The run layer (glassgpt/run.py) and the checkpoint files it reads (glassgpt/checkpoint.py)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from glassgpt import artifacts, checkpoint
from glassgpt.checkpoint import (EXTRA_ARGS_KEY, FINGERPRINT_KEY, NANOGPT_MODEL_ARGS, load_checkpoint,
                                 model_args_of, save_checkpoint, split_model_args)
from glassgpt.errors import UserError
from glassgpt.model import GPT, GPTConfig
from glassgpt.corpus import open_data, resolve_data_dir
from glassgpt.run import open_run
from glassgpt.runtime import choose_threads
from glassgpt.tokenizer import CharTokenizer


@dataclasses.dataclass
class NanoGPTConfig:
    """karpathy/nanoGPT model.py's GPTConfig, field for field (read from the repository at 3adf61e1):
    nanoGPT's sample.py does GPTConfig(**checkpoint['model_args'])."""

    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


def test_nanogpt_field_list_matches_the_mirror() -> None:
    assert tuple(f.name for f in dataclasses.fields(NanoGPTConfig)) == NANOGPT_MODEL_ARGS


def test_open_run_gives_model_tokenizer_data_and_fingerprints(char_checkpoint: Path, char_dataset: Path) -> None:
    run = open_run(char_checkpoint)
    assert isinstance(run.tokenizer, CharTokenizer) and not run.model.training
    assert run.gpt_config.n_layer == 2 and run.iter_num == 0 and run.out_dir == char_checkpoint
    side = json.loads((char_checkpoint / "ckpt.json").read_text())
    assert run.fingerprint == side["fingerprint"] == run.checkpoint_meta[FINGERPRINT_KEY]
    assert run.data_dir == char_dataset
    corpus, data_fp = open_data(char_dataset)
    assert run.data_fingerprint == data_fp and len(run.corpus.tokens("train")) == len(corpus.tokens("train"))
    prov = run.provenance()
    assert {k: prov[k] for k in ("checkpoint", "data")} == {"checkpoint": run.fingerprint, "data": data_fp}
    assert prov["data_files"]["train.bin"][0] == (char_dataset / "train.bin").stat().st_size
    assert run.stale_reasons(prov) == []
    assert run.stale_reasons({**prov, "checkpoint": "sha256:0"})[0].startswith("the weights changed")
    assert "training data" in run.stale_reasons({**prov, "data": "sha256:0"})[0]
    assert "older glassgpt" in run.stale_reasons({})[0]
    assert open_run(char_checkpoint / "ckpt.pt").fingerprint == run.fingerprint


def test_fingerprint_is_of_the_weights_and_changes_with_them(tmp_path: Path, char_dataset: Path) -> None:
    from tests.conftest import make_checkpoint

    make_checkpoint(tmp_path / "a", char_dataset, seed=0)
    make_checkpoint(tmp_path / "b", char_dataset, seed=0)
    make_checkpoint(tmp_path / "c", char_dataset, seed=1)
    fps = [open_run(tmp_path / n).fingerprint for n in "abc"]
    assert fps[0] == fps[1] != fps[2]


def test_open_run_never_rehashes_a_glassgpt_checkpoint(char_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    open_run(char_checkpoint).provenance()  # the hand-made test dataset's fingerprint is cached here

    def no(*a, **k):
        raise AssertionError("hashed on open")

    monkeypatch.setattr(checkpoint, "fingerprint_tensors", no)
    monkeypatch.setattr(artifacts, "_hash_file_into", no)
    open_run(char_checkpoint).provenance()


def test_nanogpt_checkpoint_fingerprint_is_computed_once(char_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = char_checkpoint / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    for k in (FINGERPRINT_KEY, EXTRA_ARGS_KEY, "tokenizer"):
        ckpt.pop(k)
    torch.save(ckpt, path)  # as nanoGPT writes it: no fingerprint, no sidecar
    (char_checkpoint / "ckpt.json").unlink()
    fp = open_run(char_checkpoint).fingerprint
    monkeypatch.setattr(checkpoint, "fingerprint_tensors", lambda sd: pytest.fail("re-hashed"))
    assert open_run(char_checkpoint).fingerprint == fp


def test_sidecar_that_disagrees_is_reported_and_ckpt_pt_trusted(char_checkpoint: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    side = char_checkpoint / "ckpt.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "iter_num": 99, "fingerprint": "sha256:old"}))
    run = open_run(char_checkpoint)
    err = capsys.readouterr().err
    assert "does not describe" in err and "iter_num, fingerprint" in err
    assert run.iter_num == 0 and run.fingerprint != "sha256:old"
    open_run(char_checkpoint)
    assert "does not describe" not in capsys.readouterr().err  # once per file


def test_model_args_hold_only_nanogpt_keys_for_a_nanogpt_architecture(char_checkpoint: Path) -> None:
    ckpt = torch.load(char_checkpoint / "ckpt.pt", weights_only=True)
    assert set(ckpt["model_args"]) == set(NANOGPT_MODEL_ARGS)
    NanoGPTConfig(**ckpt["model_args"])  # what nanoGPT's sample.py does
    assert GPTConfig.from_dict(model_args_of(ckpt)) == GPTConfig.from_dict({**ckpt["model_args"],
                                                                            **ckpt[EXTRA_ARGS_KEY]})


def test_other_architectures_put_every_option_in_model_args_so_nanogpt_refuses() -> None:
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    for name in sorted(names - set(NANOGPT_MODEL_ARGS)):
        f = next(f for f in dataclasses.fields(GPTConfig) if f.name == name)
        other = {str: "relu2", bool: not f.default, float: 2.0}.get(type(f.default), 3.0)
        args = {**GPTConfig().to_dict(), name: other}
        base, extra = split_model_args(args)
        assert base == args and extra[name] == other, name
        with pytest.raises(TypeError):
            NanoGPTConfig(**base)
    base, extra = split_model_args(GPTConfig().to_dict())
    assert set(base) == set(NANOGPT_MODEL_ARGS) and {**extra, **base} == GPTConfig().to_dict()


def test_full_disk_while_saving_is_one_line_and_keeps_the_old_checkpoint(char_checkpoint: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = char_checkpoint / "ckpt.pt"
    before = {p.name: p.read_bytes() for p in char_checkpoint.iterdir()}
    ckpt = torch.load(path, weights_only=True)

    def full(obj, f, *a, **k):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(UserError, match="disk is full") as e:
        save_checkpoint(path, {**ckpt, "iter_num": 5})
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in char_checkpoint.iterdir()} == before
    assert load_checkpoint(path)["iter_num"] == 0


class Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_unsafe_checkpoint_is_refused_plainly(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "model_args": {}, "evil": Payload()}, path)
    with pytest.raises(UserError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "safe load" in msg and "weights_only=False" not in msg and "\n" not in msg


def test_internal_errors_are_not_turned_into_user_errors(char_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*a, **k):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(checkpoint.torch, "load", bug)
    with pytest.raises(RuntimeError, match="internal bug"):
        load_checkpoint(char_checkpoint)


def test_truncated_checkpoint_is_a_user_error(char_checkpoint: Path) -> None:
    path = char_checkpoint / "ckpt.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_leftover_temporary_of_a_killed_save_is_removed(char_checkpoint: Path) -> None:
    orphan = char_checkpoint / ".ckpt.pt.tmp999999999"
    orphan.write_bytes(b"x" * 1000)
    load_checkpoint(char_checkpoint)
    assert not orphan.exists()
    orphan.write_bytes(b"x")
    save_checkpoint(char_checkpoint / "ckpt.pt", torch.load(char_checkpoint / "ckpt.pt", weights_only=True))
    assert sorted(p.name for p in char_checkpoint.iterdir()) == ["ckpt.json", "ckpt.pt"]


def test_resolve_data_dir_rule(tmp_path: Path) -> None:
    assert resolve_data_dir({"dataset": "x", "data_dir": "d"}, tmp_path) == tmp_path
    assert resolve_data_dir({"dataset": "x", "data_dir": "d"}) == Path("d")
    assert resolve_data_dir({"dataset": "x"}) == Path("data/x")
    assert resolve_data_dir({}) is None


def test_explicit_data_dir_and_missing_data(char_checkpoint: Path, tmp_path: Path) -> None:
    run = open_run(char_checkpoint, data_dir=tmp_path / "nowhere")
    assert run.data_fingerprint is None
    with pytest.raises(UserError, match="no prepared data"):
        run.corpus


def test_open_run_of_an_hf_export_of_a_char_model_uses_its_char_tokenizer(char_checkpoint: Path,
                                                                         tmp_path: Path) -> None:
    from glassgpt.export import main as export_main

    export_main([f"--out_dir={char_checkpoint}", "--to=hf", str(tmp_path / "hf")])
    src = open_run(char_checkpoint)
    run = open_run(tmp_path / "hf")
    assert run.kind == "hf" and isinstance(run.tokenizer, CharTokenizer)
    assert run.tokenizer.stoi == src.tokenizer.stoi
    ids = torch.tensor([src.tokenizer.encode("All:\nSpeak")])
    torch.testing.assert_close(run.model(ids)[0], src.model(ids)[0])
    assert run.fingerprint.startswith("sha256:")


def test_open_run_of_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no checkpoint"):
        open_run(tmp_path / "nope")


def test_choose_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        from glassgpt import runtime

        def cpu_times(idle_share):  # /proc/stat readings: `idle_share` of 4 cores idle over the window
            ticks = iter([(0, 0), (int(400 * idle_share), 400)])
            return lambda: next(ticks)

        monkeypatch.setattr(os, "cpu_count", lambda: 4)
        for share, want in ((1.0, 4), (0.5, 2), (0.1, 1), (0.0, 1)):  # idle, half busy, busy, overloaded
            torch.set_num_threads(4)  # torch's default on a 4-core machine
            monkeypatch.setattr(runtime, "_cpu_times", cpu_times(share))
            assert choose_threads(1_000_000, "cpu") == want
        monkeypatch.setattr(runtime, "_cpu_times", lambda: None)  # no /proc/stat: the load average
        monkeypatch.setattr(os, "getloadavg", lambda: (2.7, 0.0, 0.0))
        torch.set_num_threads(4)
        assert choose_threads(1_000_000, "cpu") == 2
        torch.set_num_threads(4)
        assert choose_threads(100_000_000, "cpu") == 4  # large models keep torch's default
        assert choose_threads(1_000_000, "cpu", threads=2) == 2 == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert choose_threads(1_000_000, "cpu") == 2
        assert choose_threads(1_000_000, "cuda") is None
        with pytest.raises(UserError):
            choose_threads(1, "cpu", threads=0)
    finally:
        torch.set_num_threads(before)


def test_pickle_of_model_args_is_plain(char_checkpoint: Path) -> None:
    """The checkpoint loads with weights_only=True: only tensors and plain data in it."""
    ckpt = torch.load(char_checkpoint / "ckpt.pt", weights_only=True)
    pickle.dumps({k: v for k, v in ckpt.items() if k != "model"})
    GPT(GPTConfig.from_dict(model_args_of(ckpt)))


# ---------------------------------------------------------------- `make test` / `make demo` set-up

REPO = Path(__file__).resolve().parents[1]


def fake_env(tmp_path: Path, gpu: bool) -> tuple[Path, dict]:
    """A .venv whose python logs its arguments (torch absent), and a PATH with or without nvidia-smi."""
    venv, bin_dir = tmp_path / "venv", tmp_path / "bin"
    (venv / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    py = venv / "bin" / "python"
    py.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase "$*" in *"import torch"*) exit 1;; esac\nexit 0\n')
    py.chmod(0o755)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return venv, env


@pytest.mark.parametrize("gpu", [False, True])
def test_make_env_installs_cpu_torch_without_a_gpu(tmp_path: Path, gpu: bool) -> None:
    import subprocess

    venv, env = fake_env(tmp_path, gpu)
    run = subprocess.run(["make", "-s", "env", f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    calls = (tmp_path / "calls.log").read_text().splitlines()
    torch_installs = [c for c in calls if "install" in c and "torch==" in c]
    assert torch_installs == [f"-m pip install -q torch==2.13.0{'' if gpu else '+cpu'}"], calls
    assert calls[-1] == "-m pip install -q -c constraints.txt -e .[test,view]"  # the pinned versions
    assert (venv / ".glassgpt-installed").exists()
    again = subprocess.run(["make", "-s", "env", f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and (tmp_path / "calls.log").read_text().splitlines() == calls  # set up once


def test_make_demo_runs_the_main_job_in_order() -> None:
    import subprocess

    run = subprocess.run(["make", "-n", "-W", ".venv/.glassgpt-installed", "demo", "VENV=/nonexistent"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    steps = [line for line in run.stdout.splitlines() if line.startswith("/nonexistent/bin/")]
    order = ["prepare.py", "train.py", "sample.py", "trace-spans --out_dir=out-shakespeare-char --build",
             "trace-spans --out_dir=out-shakespeare-char --text=",
             "trace-influence --out_dir=out-shakespeare-char --build",
             "trace-influence --out_dir=out-shakespeare-char --text="]
    found = [next(i for i, s in enumerate(steps) if key in s) for key in order]
    assert found == sorted(found), steps


def test_a_sidecar_of_an_older_glassgpt_without_fingerprint_is_no_disagreement(char_checkpoint: Path,
                                                                              capsys: pytest.CaptureFixture) -> None:
    side = char_checkpoint / "ckpt.json"
    meta = json.loads(side.read_text())
    meta.pop("fingerprint")
    side.write_text(json.dumps(meta))
    open_run(char_checkpoint)
    assert "does not describe" not in capsys.readouterr().err


def test_open_data_does_not_import_torch(char_dataset: Path) -> None:
    """Commands that need data but no model (a span query) must not pay torch's import."""
    import subprocess
    import sys

    code = ("import sys; from glassgpt.corpus import open_data; c, fp = open_data(sys.argv[1]); "
            "assert fp.startswith('sha256:'); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, str(char_dataset)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_a_zip_that_is_not_a_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "ckpt.pt", "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_untied_checkpoint_without_lm_head_is_refused():
    """Only a tied head may be absent from a state dict (it is wte under another name)."""
    from glassgpt.checkpoint import model_from_checkpoint
    from glassgpt.model import GPT, GPTConfig

    cfg = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8, tie_embeddings=False)
    state = GPT(cfg).state_dict()
    state.pop("lm_head.weight")
    with pytest.raises(UserError, match="lm_head.weight"):
        model_from_checkpoint({"model": state, "model_args": cfg.to_dict()})
    tied = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)
    state = GPT(tied).state_dict()
    state.pop("lm_head.weight")
    model_from_checkpoint({"model": state, "model_args": tied.to_dict()})  # loads: wte is the head


def test_cpu_bf16_support_from_cpuinfo(tmp_path: Path) -> None:
    from glassgpt.runtime import cpu_has_native_bf16

    (tmp_path / "amx").write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n")
    (tmp_path / "avx2").write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_has_native_bf16(str(tmp_path / "amx")) and cpu_has_native_bf16(str(tmp_path / "arm"))
    assert not cpu_has_native_bf16(str(tmp_path / "avx2"))
    assert cpu_has_native_bf16(str(tmp_path / "missing"))  # cannot tell: no warning
