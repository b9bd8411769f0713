"""The one artifact writer and the one fingerprint helper (glassgpt/artifacts.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from glassgpt import artifacts
from glassgpt.artifacts import (clean_leftovers, fingerprint_bytes, fingerprint_file, fingerprint_files,
                                fingerprint_tensors, read_json, write_artifact, write_file_atomic,
                                write_json_atomic)
from glassgpt.errors import UserError

DEAD_PID = 999_999_999  # above any pid_max: never a live process


def listing(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_write_artifact_replaces_the_whole_directory(tmp_path: Path) -> None:
    target = tmp_path / "index"
    with write_artifact(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
        (tmp / "stale.bin").write_bytes(b"only in the old version")
        write_json_atomic(tmp / "index.json", {"v": 1})
    with write_artifact(target) as tmp:
        (tmp / "a.bin").write_bytes(b"new")
        write_json_atomic(tmp / "index.json", {"v": 2})
    assert listing(target) == {"a.bin": b"new", "index.json": b'{\n "v": 2\n}\n'}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temporaries left


def test_write_artifact_failure_leaves_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "index"
    with write_artifact(target) as tmp:
        (tmp / "a.bin").write_bytes(b"old")
    before = listing(target)
    with pytest.raises(KeyError):
        with write_artifact(target) as tmp:
            (tmp / "a.bin").write_bytes(b"half")
            raise KeyError("a bug mid-build")
    assert listing(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_write_artifact_without_rename_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two-rename fallback (no renameat2) gives the same result."""
    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    target = tmp_path / "index"
    for v in (b"1", b"2"):
        with write_artifact(target) as tmp:
            (tmp / "a.bin").write_bytes(v)
    assert listing(target) == {"a.bin": b"2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_keep_others_carries_files_it_did_not_write(tmp_path: Path) -> None:
    target = tmp_path / "shakespeare_char"
    target.mkdir()
    (target / "prepare.py").write_text("# the shim")
    (target / "train.bin").write_bytes(b"old")
    with write_artifact(target, keep_others=True) as tmp:
        (tmp / "train.bin").write_bytes(b"new")
    assert listing(target) == {"prepare.py": b"# the shim", "train.bin": b"new"}


def test_leftovers_of_killed_writes_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "index"
    target.mkdir()
    (target / "a.bin").write_bytes(b"good")
    dead_tmp = tmp_path / f".index.tmp{DEAD_PID}"
    dead_tmp.mkdir()
    (dead_tmp / "a.bin").write_bytes(b"half")
    live_tmp = tmp_path / f".index.tmp{os.getppid()}"  # a live writer's: left alone
    live_tmp.mkdir()
    assert clean_leftovers(target) == [dead_tmp]
    assert live_tmp.exists() and not dead_tmp.exists()
    live_tmp.rmdir()


def test_kill_between_the_two_renames_puts_the_old_version_back(tmp_path: Path) -> None:
    target = tmp_path / "index"
    old = tmp_path / f".index.old{DEAD_PID}"
    old.mkdir()
    (old / "a.bin").write_bytes(b"good")
    clean_leftovers(target)
    assert listing(target) == {"a.bin": b"good"} and not old.exists()


def test_kill_9_during_a_write_leaves_old_artifact_and_next_write_cleans(tmp_path: Path) -> None:
    target = tmp_path / "index"
    with write_artifact(target) as tmp:
        (tmp / "a.bin").write_bytes(b"good")
    code = ("import sys, time; from glassgpt.artifacts import write_artifact\n"
            f"with write_artifact({str(target)!r}) as tmp:\n"
            "    (tmp / 'a.bin').write_bytes(b'half'); print('in', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "in"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert listing(target) == {"a.bin": b"good"}
    assert len(list(tmp_path.iterdir())) == 2  # the orphan exists ...
    with write_artifact(target) as tmp:
        (tmp / "a.bin").write_bytes(b"next")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # ... and the next write removed it


def test_write_file_atomic_full_disk_is_one_line_and_keeps_the_old_file(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.json"
    write_json_atomic(path, {"v": 1})

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="disk is full") as e:
        write_file_atomic(path, full)
    assert "\n" not in str(e.value)
    assert read_json(path) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_read_json_missing_and_corrupt(tmp_path: Path) -> None:
    assert read_json(tmp_path / "nope.json", default=None) is None
    with pytest.raises(UserError, match="missing"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(tmp_path / "bad.json")
    assert read_json(tmp_path / "bad.json", default={}, strict=False) == {}


def test_fingerprint_file_is_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc" * 1000)
    fp = fingerprint_file(path)
    assert fp == fingerprint_bytes(b"abc" * 1000) and fp.startswith("sha256:")

    def no_reading(h, p):
        raise AssertionError("re-hashed an unchanged file")

    monkeypatch.setattr(artifacts, "_hash_file_into", no_reading)
    assert fingerprint_file(path) == fp
    monkeypatch.undo()
    path.write_bytes(b"abd" * 1000)  # same size, new mtime and bytes
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint_file(path) == fingerprint_bytes(b"abd" * 1000)


def test_fingerprint_files_names_matter(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"1")
    (tmp_path / "b").write_bytes(b"2")
    fp = fingerprint_files([tmp_path / "a", tmp_path / "b"], cache=False)
    assert fp != fingerprint_files([tmp_path / "b", tmp_path / "a"], cache=False)


def test_fingerprint_tensors() -> None:
    sd = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    fp = fingerprint_tensors(sd)
    assert fp == fingerprint_tensors(dict(reversed(list(sd.items()))))  # order-free
    assert fp == fingerprint_tensors({k: v.clone() for k, v in sd.items()})
    changed = {**sd, "w": sd["w"].clone()}
    changed["w"][0, 0] = 1e-7
    assert fingerprint_tensors(changed) != fp
    assert fingerprint_tensors({**sd, "w": sd["w"].reshape(3, 2)}) != fp  # shape is part of it


def test_fingerprint_tensors_speed_is_linear_not_pathological() -> None:
    sd = {"w": torch.randn(1 << 20)}  # 4 MB
    t0 = time.perf_counter()
    fingerprint_tensors(sd)
    assert time.perf_counter() - t0 < 2.0


def test_an_unexpected_oserror_inside_the_block_is_not_called_a_disk_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with write_artifact(tmp_path / "index") as tmp:
            (tmp / "missing" / "x").read_bytes()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the artifact protocol


class _Source:
    """A stand-in for a Run: its provenance and why a given built_from is stale."""

    def __init__(self, fp: str):
        self.fp = fp

    def provenance(self) -> dict:
        return {"checkpoint": self.fp}

    def stale_reasons(self, built_from: dict | None) -> list[str]:
        then = (built_from or {}).get("checkpoint")
        return [] if then == self.fp else [f"the weights changed ({then} -> {self.fp})"]


def test_save_then_open_artifact(tmp_path: Path) -> None:
    import numpy as np

    from glassgpt.artifacts import open_artifact, rebuild_command, save_artifact

    d, src = tmp_path / "out" / "knn_train", _Source("sha256:a")
    cmd = rebuild_command("knn", out_dir=tmp_path / "out", store_dir=None)
    assert cmd == f"glassgpt trace-knn --out_dir={tmp_path / 'out'} --build"
    want = "glassgpt trace-spans --build --data_dir=d --index_dir=x"
    assert rebuild_command("spans", data_dir="d", index_dir="x") == want
    with pytest.raises(UserError, match=r"no kNN store in .*store.json missing\); build it with `glassgpt trace-knn"):
        open_artifact(d, "knn", rebuild=cmd, source=src)
    with save_artifact(d, "knn", params={"context": 8}, built_from=src.provenance(), rebuild=cmd) as w:
        np.save(w.dir / "x.npy", np.arange(3))
        w.meta["n_windows"] = 3
        assert not d.exists()  # nothing appears before the block ends
    art = open_artifact(d, "knn", rebuild=cmd, source=src, params={"context": 8})
    assert art.meta["n_windows"] == 3 and art.params == {"context": 8} and art.stale == []
    assert art.meta["format"] == "glassgpt-knn/2" and art.meta["rebuild"] == cmd and art.meta["kind"] == "knn"
    with pytest.raises(UserError, match=r"built with other settings \(context=8 not 16\); rebuild it with"):
        open_artifact(d, "knn", rebuild=cmd, source=src, params={"context": 16})
    with pytest.raises(UserError, match=r"is stale: the weights changed .*; rebuild it with `.*` or pass --x"):
        open_artifact(d, "knn", rebuild=cmd, source=_Source("sha256:b"), stale_hint=" or pass --x")
    stale = open_artifact(d, "knn", rebuild=cmd, source=_Source("sha256:b"), allow_stale=True)
    assert stale.stale and "weights changed" in stale.stale[0]
    with pytest.raises(UserError, match=r"damaged \(x.npy is short\); rebuild it with"):
        raise art.damaged("x.npy is short")


def test_an_older_format_or_a_broken_sidecar_is_one_rebuild_line(tmp_path: Path) -> None:
    from glassgpt.artifacts import Unusable, open_artifact

    d = tmp_path / "neurons_baseline"
    d.mkdir()
    (d / "meta.json").write_text('{"format": "glassgpt-neurons/1", "params": {}}')
    with pytest.raises(Unusable, match=r"not a glassgpt-neurons/2 neuron baseline \(it says 'glassgpt-neurons/1'"
                                       r".*rebuild it with `CMD`") as e:
        open_artifact(d, "neurons", rebuild="CMD")
    assert "rebuild" not in e.value.reason  # what a build-on-demand logs
    (d / "meta.json").write_text('{"format": ')
    with pytest.raises(UserError, match="not valid JSON.*rebuild it with `CMD`"):
        open_artifact(d, "neurons", rebuild="CMD")
