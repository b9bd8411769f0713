"""One way to write things to disk, one way to fingerprint them, one way to save and open an index.

An artifact is a directory that appears by one rename (`write_artifact`); a single file is replaced
by one rename (`write_file_atomic`). Both fsync what they wrote and the directory that holds it, and
both clean up the temporaries of writes that were killed.

Every derived index (span index, kNN store, neuron baseline and examples, ...) is saved with
`save_artifact` and opened with `open_artifact`: its sidecar names the format, the parameters, what it
was built from (`run.provenance()`) and the command that rebuilds it, and opening it says in one line
why it cannot be used and which command fixes that. `ARTIFACTS` is the one table of kinds and their
build commands. docs/FORMATS.md describes the layouts and how a new engine plugs in.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from glassgpt.errors import UserError

HASH = "sha256"
CHUNK = 1 << 22
# `.NAME.tmp<pid>` (being written) and `.NAME.old<pid>` (the replaced version, about to be removed)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)(?P<pid>\d+)$")
_MISSING = object()
# what the disk or the directory says when a write cannot be done (other OSErrors are bugs and propagate)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.ENOTDIR,
                errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG}


# ---------------------------------------------------------------- fingerprints


def _digest(h: Any) -> str:
    return f"{HASH}:{h.hexdigest()}"


def fingerprint_bytes(*chunks: bytes | bytearray | memoryview | str) -> str:
    """'sha256:<hex>' of the chunks in order (str chunks are UTF-8 encoded)."""
    h = hashlib.new(HASH)
    for c in chunks:
        h.update(c.encode() if isinstance(c, str) else c)
    return _digest(h)


def _hash_file_into(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)


def fingerprint_file(path: str | Path, *, cache: bool = True) -> str:
    """'sha256:<hex>' of a file's bytes. With `cache`, the result is kept in `.NAME.fingerprint.json`
    beside it, keyed by (size, mtime_ns), so only the first query of an unchanged file reads it."""
    return fingerprint_files([path], cache=cache)


def fingerprint_files(paths: Iterable[str | Path], *, cache: bool = True) -> str:
    """One fingerprint over several files (their names and bytes, in the order given); cached like
    `fingerprint_file`."""
    files = [Path(p) for p in paths]
    if not files:
        raise ValueError("fingerprint_files needs at least one path")

    def compute() -> str:
        h = hashlib.new(HASH)
        for p in files:
            if len(files) > 1:
                h.update(p.name.encode() + b"\0")
            _hash_file_into(h, p)
        return _digest(h)

    return cached_fingerprint(files, compute) if cache else compute()


def cached_fingerprint(paths: list[Path], compute: Callable[[], str]) -> str:
    """`compute()` once per version of `paths`: the result is kept in a sidecar beside the first
    path (`.NAME.fingerprint.json`), keyed by each file's (name, size, mtime_ns). For files written
    elsewhere (nanoGPT) that carry no fingerprint of their own."""
    key = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in paths]
    side = paths[0].parent / f".{paths[0].name}.fingerprint.json"
    known = read_json(side, default=None, strict=False)
    if isinstance(known, dict) and known.get("files") == key and known.get("fingerprint"):
        return str(known["fingerprint"])
    fp = compute()
    try:  # a read-only dataset is still usable, just not cached
        write_json_atomic(side, {"files": key, "fingerprint": fp})
    except UserError:
        pass
    return fp


def fingerprint_tensors(state_dict: dict[str, Any]) -> str:
    """'sha256:<hex>' over a state dict's names, dtypes, shapes and bytes (sorted by name): the
    fingerprint of a checkpoint's weights, the same whichever device or file they came from."""
    import torch

    h = hashlib.new(HASH)
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\0".encode())
        # view as bytes: numpy has no bfloat16, and this is the exact storage either way
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the buffer itself, no copy
    return _digest(h)


# ---------------------------------------------------------------- fsync and leftovers


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(target: str | Path) -> list[Path]:
    """Remove the temporaries a killed write of `target` left beside it (their process is gone).
    If the kill fell between the two renames of a directory swap, the old version is put back."""
    target = Path(target)
    removed: list[Path] = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _LEFTOVER.match(p.name)
        if not m or m["name"] != target.name or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not target.exists():
            os.rename(p, target)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------- writers


@contextlib.contextmanager
def write_artifact(target_dir: str | Path, *, keep_others: bool = False) -> Iterator[Path]:
    """`with write_artifact(d) as tmp:` write the artifact's files (sidecar included) into `tmp`, a
    fresh directory beside `d`; on success they are fsynced and `tmp` replaces `d` in one rename, on
    an exception `tmp` is removed and `d` is untouched.

    `keep_others`: entries of the old `d` that were not written anew are carried into the new one
    (hard links), for directories that also hold other things (data/<name>/prepare.py, input.txt).
    """
    target = Path(target_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(target)
        tmp = target.parent / f".{target.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise _disk_error(target, e) from None
    try:
        yield tmp
        if keep_others and target.is_dir():
            for old in target.iterdir():
                new = tmp / old.name
                if new.exists() or old.name.endswith(".fingerprint.json"):
                    continue  # written anew, or a cache of the old files' fingerprint
                if old.is_dir() and not old.is_symlink():
                    shutil.copytree(old, new, copy_function=_link_or_copy, symlinks=True)
                else:
                    _link_or_copy(str(old), str(new))
        _fsync_tree(tmp)
        _swap_into_place(tmp, target)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise _disk_error(target, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(target_dir: str | Path) -> Path:
    """Fail before long work, not after it: make the directory `target_dir` will be written in (a file
    in the way, a read-only disk -> the one-line UserError of a failed write)."""
    target = Path(target_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise _disk_error(target, e) from None
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        pass  # tmp now holds the old version; the caller's `finally` removes it
    else:
        old = target.parent / f".{target.name}.old{os.getpid()}"
        os.rename(target, old)  # a kill here is repaired by clean_leftovers (old is put back)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def _disk_error(path: Path, e: OSError) -> UserError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a file is in the way where a directory should be"
    else:
        why = e.strerror or type(e).__name__
    todo = "free space or choose another directory" if why == "the disk is full" else "choose another directory"
    return UserError(f"could not write {path} ({why}); the previous version is unchanged; {todo}, and run again")


def write_file_atomic(path: str | Path, data_or_writer: bytes | str | Callable[[IO[bytes]], Any]) -> Path:
    """Replace `path` by one rename: `data_or_writer` is the bytes (or text) or a function that
    writes into the open binary file. fsyncs the file and its directory; an OSError (full disk,
    read-only) becomes one UserError line and the old file stays."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        with open(tmp, "wb") as f:
            if callable(data_or_writer):
                data_or_writer(f)
            else:
                f.write(data_or_writer.encode() if isinstance(data_or_writer, str) else data_or_writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise _disk_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):  # e.g. the parent is a file: there is no temporary to remove
            tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_file_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


def read_json(path: str | Path, default: Any = _MISSING, *, strict: bool = True) -> Any:
    """A JSON file's content. Missing: `default` if given, else a UserError. Not valid JSON: a
    UserError naming the file (or `default` when `strict=False`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if default is not _MISSING:
            return default
        raise UserError(f"{path} is missing") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        if not strict and default is not _MISSING:
            return default
        raise UserError(f"{path} is not valid JSON ({e}); it is corrupt or truncated, rebuild it") from None


# ---------------------------------------------------------------- the artifact protocol


@dataclass(frozen=True)
class ArtifactKind:
    """One kind of derived index: how it is named, checked and rebuilt."""

    name: str  # the registry key (the viewer's name for it)
    title: str  # in messages: "the kNN store in DIR is stale: ..."
    format: str  # the sidecar's "format"; a reader opens exactly this one
    sidecar: str  # the sidecar's file name inside the artifact directory
    command: str  # the build command; {out_dir} / {data_dir} are filled in by `rebuild_command`


ARTIFACTS: dict[str, ArtifactKind] = {}


def register(kind: ArtifactKind) -> ArtifactKind:
    ARTIFACTS[kind.name] = kind
    return kind


register(ArtifactKind("spans", "span index", "glassgpt-spans/4", "{split}.index.json",
                      "glassgpt trace-spans --build --data_dir={data_dir}"))
register(ArtifactKind("knn", "kNN store", "glassgpt-knn/2", "store.json",
                      "glassgpt trace-knn --out_dir={out_dir} --build"))
register(ArtifactKind("neurons", "neuron baseline", "glassgpt-neurons/2", "meta.json",
                      "glassgpt trace-neurons --out_dir={out_dir} --build_baseline"))
register(ArtifactKind("examples", "neuron examples", "glassgpt-neurons/2", "meta.json",
                      "glassgpt neuron --out_dir={out_dir} --layer=0 --index=0"))
register(ArtifactKind("influence", "influence store", "glassgpt-influence/1", "store.json",
                      "glassgpt trace-influence --out_dir={out_dir} --build"))


def rebuild_command(kind: str, *, out_dir: str | Path | None = None, data_dir: str | Path | None = None,
                    **options: Any) -> str:
    """The command that builds `kind` for a run (`out_dir`) or a dataset (`data_dir`), whichever its
    template names; each option that is not None is appended as --key=value (a non-default index_dir)."""
    cmd = ARTIFACTS[kind].command.format(out_dir=out_dir, data_dir=data_dir)
    return cmd + "".join(f" --{k}={v}" for k, v in options.items() if v is not None)


class Source(Protocol):
    """What an artifact was built from, now: a Run (weights + data) or a Corpus (data only)."""

    def provenance(self) -> dict[str, Any]: ...

    def stale_reasons(self, built_from: dict[str, Any] | None) -> list[str]: ...


def sidecar_dict(kind: str, *, params: dict[str, Any], built_from: dict[str, Any], rebuild: str,
                 **extra: Any) -> dict[str, Any]:
    """The protocol's sidecar: format, kind, params, built_from, rebuild, built_at, then the kind's own fields."""
    return {"format": ARTIFACTS[kind].format, "kind": kind, "params": params, "built_from": built_from,
            "rebuild": rebuild, "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}


@dataclass
class Saving:
    """Inside `save_artifact`: write files into `dir`; add the kind's own sidecar fields to `meta`."""

    dir: Path
    meta: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def save_artifact(path: str | Path, kind: str, *, params: dict[str, Any], built_from: dict[str, Any],
                  rebuild: str, sidecar: str | None = None) -> Iterator[Saving]:
    """`with save_artifact(d, "knn", params=..., built_from=run.provenance(), rebuild=cmd) as w:` write
    the arrays into `w.dir`; the sidecar is written last and the directory replaces `d` in one rename
    (write_artifact). An exception leaves the old `d` as it was."""
    with write_artifact(path) as tmp:
        w = Saving(tmp)
        yield w
        name = sidecar or ARTIFACTS[kind].sidecar
        write_json_atomic(tmp / name, sidecar_dict(kind, params=params, built_from=built_from, rebuild=rebuild,
                                                   **w.meta))


class Unusable(UserError):
    """An artifact that cannot be used as it is: `reason` says why; the message adds the command."""

    def __init__(self, reason: str, rebuild: str, verb: str = "rebuild", hint: str = ""):
        super().__init__(f"{reason}; {verb} it with `{rebuild}`{hint}")
        self.reason = reason


@dataclass
class Artifact:
    """An opened artifact's sidecar, where it is, why it is stale (allow_stale) and how to rebuild it."""

    path: Path
    kind: ArtifactKind
    meta: dict[str, Any]
    rebuild: str
    stale: list[str] = field(default_factory=list)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.meta.get("params") or {})

    def damaged(self, what: str) -> Unusable:
        """The one line for a file that disagrees with the sidecar."""
        return Unusable(f"the {self.kind.title} in {self.path} is damaged ({what})", self.rebuild)


def open_artifact(path: str | Path, kind: str, *, rebuild: str, source: Source | None = None,
                  params: dict[str, Any] | None = None, sidecar: str | None = None, allow_stale: bool = False,
                  stale_hint: str = "") -> Artifact:
    """Read and check an artifact's sidecar: present, valid, this format, built with `params` (when
    given) and from what `source` is now (its stale_reasons: a string compare of fingerprints, plus a
    re-fingerprint when a data file's size or mtime moved). A UserError naming `rebuild` otherwise;
    with `allow_stale` a stale artifact opens with its reasons in `.stale`. The error is an `Unusable`,
    whose `.reason` a command that builds on demand can log before it builds."""
    k, path = ARTIFACTS[kind], Path(path)
    side = path / (sidecar or k.sidecar)
    meta = read_json(side, default=None, strict=False)
    if meta is None and not side.exists():
        raise Unusable(f"no {k.title} in {path} ({side.name} missing)", rebuild, "build")
    if not isinstance(meta, dict):
        raise Unusable(f"{side} is not valid JSON (corrupt or cut short)", rebuild)
    if meta.get("format") != k.format:
        raise Unusable(f"{side} is not a {k.format} {k.title} (it says {meta.get('format')!r}: written by "
                       "another glassgpt version)", rebuild)
    art = Artifact(path, k, meta, rebuild)
    if params is not None and art.params != params:
        diff = ", ".join(f"{key}={art.params.get(key)!r} not {v!r}" for key, v in params.items()
                         if art.params.get(key) != v)
        raise Unusable(f"the {k.title} in {path} was built with other settings ({diff})", rebuild)
    art.stale = source.stale_reasons(meta.get("built_from")) if source is not None else []
    if art.stale and not allow_stale:
        raise Unusable(f"the {k.title} in {path} is stale: {'; '.join(art.stale)}", rebuild, hint=stale_hint)
    return art
