"""HellaSwag by name: `--hellaswag val` (and `data.hellaswag = "val"`) is the validation file that build-nanogpt and
llm.c evaluate on, fetched once from the benchmark's own repository into the Hugging Face assets cache
(HF_HOME/assets), to a partial file first, checked against its git blob SHA-1 and renamed into place only when it
matches: a file in the cache is always the whole, right one. Anything else is a local path, read as it is.

GPT2_HELLASWAG_BASE_URL points at another copy of the same files (a mirror; the tests' loopback server).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from gpt2_common import hub
from gpt2_common.errors import UserError

BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
BASE_URL_ENV = "GPT2_HELLASWAG_BASE_URL"
# name -> (file, its git blob SHA-1 in rowanz/hellaswag); val holds 10,042 examples
SPLITS = {"val": ("hellaswag_val.jsonl", "0f5ee25d72216f12317d5d8a7b92deafa423d81e")}


def hellaswag_path(text: str) -> Path:
    """The local file that `text` names: a split name (val) fetched into the cache on first use, else the path."""
    if text not in SPLITS:
        return Path(text)
    file, sha1 = SPLITS[text]
    target = cache_folder() / file
    if target.is_file():
        return target
    if hub.offline():
        raise UserError(f"HF_HUB_OFFLINE=1 and HellaSwag's {text} file is not in the cache ({target}); run once "
                        "without HF_HUB_OFFLINE to download it")
    url = f"{os.environ.get(BASE_URL_ENV) or BASE_URL}/{file}"
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{file}.partial-{os.getpid()}")
    try:
        got = _download(url, partial)
        if got != sha1:
            raise UserError(f"HellaSwag's {text} file from {url} does not match its checksum (git SHA-1 {got[:12]}..., "
                            f"expected {sha1[:12]}...); nothing was kept: check {BASE_URL_ENV} or the network and run "
                            "again")
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    return target


def cache_folder() -> Path:
    """HF_HOME/assets/gpt2-jax-torch/hellaswag: huggingface_hub's place for a library's own downloads."""
    from huggingface_hub import constants

    return Path(constants.HF_ASSETS_CACHE) / "gpt2-jax-torch" / "hellaswag"


def _download(url: str, to: Path) -> str:
    """Downloads url to `to`; returns the git blob SHA-1 of what arrived (git's id: sha1 of "blob SIZE\\0" + data)."""
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(to, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                size += len(chunk)
    except urllib.error.HTTPError as err:
        raise UserError(f"cannot download HellaSwag from {url}: the server answered {err.code}; check "
                        f"{BASE_URL_ENV}, or give a local file (--hellaswag path/to/hellaswag_val.jsonl)") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(f"cannot download HellaSwag from {url} ({reason}); check the network (or {BASE_URL_ENV} for "
                        "a mirror), or give a local file (--hellaswag path/to/hellaswag_val.jsonl)") from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device while downloading HellaSwag into {to.parent}; free space "
                            "there, or point HF_HOME at a larger disk") from None
        raise
    blob = hashlib.sha1(b"blob %d\0" % size)
    with open(to, "rb") as f:
        while chunk := f.read(1 << 20):
            blob.update(chunk)
    return blob.hexdigest()
