"""Fetching the public files glassgpt needs: from a local mirror when one is set, else the canonical URL.

Every file has a canonical URL and a sha256. Offline machines point `GLASSGPT_MIRROR` at a directory
laid out like this project's shared data (`tinyshakespeare/input.txt`, `gpt2/encoder.json`,
`gpt2/vocab.bpe`); the checksum is verified either way, so a mirror cannot silently differ.
"""

from __future__ import annotations

import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from glassgpt.errors import UserError

MIRROR_ENV = "GLASSGPT_MIRROR"


@dataclass(frozen=True)
class RemoteFile:
    mirror_path: str  # path inside a GLASSGPT_MIRROR directory
    url: str
    sha256: str


TINYSHAKESPEARE = RemoteFile(
    "tinyshakespeare/input.txt",
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
GPT2_ENCODER_JSON = RemoteFile(
    "gpt2/encoder.json",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
)
GPT2_VOCAB_BPE = RemoteFile(
    "gpt2/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file (glassgpt.artifacts' fingerprint, without its 'sha256:' prefix)."""
    from glassgpt.artifacts import fingerprint_file

    return fingerprint_file(path, cache=False).split(":", 1)[1]


def mirror_dir() -> Path | None:
    d = os.environ.get(MIRROR_ENV)
    return Path(d) if d else None


def fetch(remote: RemoteFile, dest: str | Path) -> Path:
    """Make `dest` hold the verified file: reuse it if already right, else copy from the mirror,
    else download. Raises UserError with what to do when none of these works."""
    dest = Path(dest)
    if dest.exists() and sha256_file(dest) == remote.sha256:
        return dest
    mirror = mirror_dir()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    if mirror is not None:
        src = mirror / remote.mirror_path
        if not src.exists():
            raise UserError(f"{MIRROR_ENV}={mirror} has no {remote.mirror_path}; put the file there or unset "
                            f"{MIRROR_ENV} to download {remote.url}")
        tmp.write_bytes(src.read_bytes())
    else:
        try:
            with urllib.request.urlopen(remote.url, timeout=60) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(
                f"could not download {remote.url} ({e}); offline, set {MIRROR_ENV} to a directory holding "
                f"{remote.mirror_path}"
            ) from None
    got = sha256_file(tmp)
    if got != remote.sha256:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{remote.mirror_path}: sha256 {got} does not match the expected {remote.sha256}")
    os.replace(tmp, dest)
    return dest


def local_or_fetch(remote: RemoteFile, cache_dir: str | Path) -> Path:
    """Path to a verified copy: the mirror's file itself when a mirror is set, else a cached download."""
    mirror = mirror_dir()
    if mirror is not None and (mirror / remote.mirror_path).exists():
        src = mirror / remote.mirror_path
        if sha256_file(src) != remote.sha256:
            raise UserError(f"{src}: sha256 does not match the expected {remote.sha256}")
        return src
    return fetch(remote, Path(cache_dir) / remote.mirror_path)
