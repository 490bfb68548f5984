"""Names for what lives on the Hugging Face Hub: `hf:REPO[@REVISION]`, and `hf:gpt2` ... `hf:gpt2-xl` for OpenAI's
four GPT-2s. A name is fetched with huggingface_hub into the user's own Hugging Face cache (HF_HOME, HF_HUB_CACHE),
as every Hugging Face tool does, so that HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE work as their users expect; then
it is read like any local folder. A bare word is always a local path: only the `hf:` prefix reaches the network.

huggingface_hub is imported only when a name is given: resolving a path imports nothing, and a script answers bad
input before it imports a framework. Every failure of the Hub (no network, a missing repository, revision or file,
a token it refuses, a full disk) becomes one line that says what to do (`hub_errors`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gpt2_common.errors import UserError

PREFIX = "hf:"
# OpenAI's GPT-2s, as the Hub keeps them since the legacy single-word names moved under openai-community/
GPT2_NAMES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
# What a GPT-2 needs from a model repository: its config and safetensors weights, single or sharded; never the
# other frameworks' copies (pytorch_model.bin, tf_model.h5, flax_model.msgpack, the ONNX exports) that repos carry too.
WEIGHT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json"]
_REPO = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def is_name(text: object) -> bool:
    """Whether `text` names something on the Hub (`hf:...`) rather than a local path."""
    return isinstance(text, str) and text.startswith(PREFIX)


@dataclass(frozen=True)
class HubName:
    """`hf:REPO[@REVISION]`: `text` as the user typed it, the repository it means, and a branch, tag or commit."""

    text: str
    repo: str
    revision: str | None = None

    def pinned(self, commit: str) -> str:
        """The name at one commit, as a record of exactly what was read: hf:REPO@COMMIT."""
        return f"{PREFIX}{self.repo}@{commit}"


def parse(text: str) -> HubName:
    """`hf:gpt2` -> openai-community/gpt2; `hf:OWNER/REPO@REVISION`; anything else is one line naming the form."""
    body = text[len(PREFIX):]
    repo, _, revision = body.partition("@")
    repo = GPT2_NAMES.get(repo, repo)
    if not _REPO.fullmatch(repo) or "--" in repo or ".." in repo or (revision == "" and "@" in body):
        raise UserError(f"'{text}' is not a Hub name; write hf:OWNER/REPO or hf:OWNER/REPO@REVISION (a branch, tag "
                        f"or commit), or hf:{', hf:'.join(GPT2_NAMES)} for OpenAI's GPT-2s")
    return HubName(text, repo, revision or None)


def missing_hint(path: str | os.PathLike) -> str:
    """For a local path that does not exist and is named like one of OpenAI's GPT-2s (`gpt2`): how to name the Hub's,
    since a bare word never goes to the network."""
    word = Path(path).name
    return f" (OpenAI's GPT-2 on the Hugging Face Hub is hf:{word})" if word in GPT2_NAMES else ""


def cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


# --- errors ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def hub_errors(name: HubName, kind: str = "model") -> Iterator[None]:
    """Turns what huggingface_hub raises into one line for the user. Its own messages start "404 Client Error" and
    run for several lines; this says what was missing and the fix: HF_TOKEN, the revision, HF_HUB_OFFLINE."""
    from huggingface_hub import errors as hf

    where = f"{endpoint()}/{'datasets/' if kind == 'dataset' else ''}{name.repo}"
    try:
        yield
    except UserError:
        raise
    except hf.RevisionNotFoundError:
        raise UserError(f"{name.text}: the {kind} repository {name.repo} has no revision '{name.revision}'; give one "
                        f"of its branches, tags or commits ({where})") from None
    except hf.RemoteEntryNotFoundError as err:
        raise UserError(f"{name.text}: the {kind} repository {name.repo} has no file "
                        f"'{_file_of(str(err.response.url))}' at that revision") from None
    except hf.GatedRepoError:
        raise UserError(f"{name.text} is gated: accept its conditions at {where} and set HF_TOKEN to an access token "
                        "of that account") from None
    except hf.RepositoryNotFoundError:
        raise UserError(f"{name.text}: no {kind} repository {name.repo} on the Hub ({endpoint()}), or it is private: "
                        "check the name, or set HF_TOKEN to an access token that can read it") from None
    except hf.HfHubHTTPError as err:
        raise UserError(_http_line(name, err.response.status_code, kind)) from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled) as err:
        refused = _in_chain(err, hf.HfHubHTTPError)  # what stopped the download with nothing cached to fall back on
        if refused is not None and not offline():
            raise UserError(_http_line(name, refused.response.status_code, kind)) from None
        raise UserError(_unreachable_line(name, err)) from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device while downloading {name.text} into {cache_dir()}: free "
                            "space there, or point HF_HOME at a larger disk") from None
        if "Consistency check failed" in str(err):  # huggingface_hub's own check of a download's size
            raise UserError(f"a download of {name.text} ended early (the connection was cut); run the same command "
                            "again: files already downloaded are kept") from None
        raise
    except Exception as err:
        if _is_network_error(err):
            raise UserError(_unreachable_line(name, err)) from None
        raise


def _http_line(name: HubName, status: int, kind: str) -> str:
    if status == 401:
        return (f"the Hub refused {name.text} (401 Unauthorized): HF_TOKEN is missing or not valid; set HF_TOKEN to "
                f"an access token that can read the {kind} repository {name.repo}")
    if status == 403:
        return (f"the Hub refused {name.text} (403 Forbidden): set HF_TOKEN to an access token with read access to "
                f"the {kind} repository {name.repo}")
    if status == 429 or status >= 500:
        return (f"the Hub answered {status} for {name.text} and kept answering so; try again later (what is "
                "already downloaded is kept)")
    return f"the Hub answered {status} for {name.text}"


def _unreachable_line(name: HubName, err: BaseException) -> str:
    if offline():
        return (f"HF_HUB_OFFLINE=1 and {name.text} is not (all) in the Hugging Face cache ({cache_dir()}); run once "
                "without HF_HUB_OFFLINE to download it")
    cause = err if _is_network_error(err) else _root_cause(err)
    return (f"cannot reach the Hub at {endpoint()} ({type(cause).__name__}: {_first_line(cause)}) and {name.text} "
            f"is not (all) in the Hugging Face cache ({cache_dir()}); check the network (HF_ENDPOINT for a mirror). "
            "Once its files are cached, HF_HUB_OFFLINE=1 reads them without the network")


def _in_chain(err: BaseException | None, kind: type) -> BaseException | None:
    while err is not None and not isinstance(err, kind):
        err = err.__cause__ or err.__context__
    return err


def _root_cause(err: BaseException) -> BaseException:
    while (err.__cause__ or err.__context__) is not None:
        err = err.__cause__ or err.__context__
    return err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:160] if text else "no message"


def _is_network_error(err: BaseException) -> bool:
    import httpx2

    return isinstance(err, (httpx2.TransportError, ConnectionError, TimeoutError))


def _file_of(url: str) -> str:
    from urllib.parse import unquote

    return unquote(url.split("/resolve/", 1)[-1].split("/", 1)[-1])


# --- fetching -------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def weights_folder(text: str) -> Path:
    """The local folder of a model repository's config.json and safetensors weights (downloaded into the cache on
    first use): what gpt2_formats then reads as a Hugging Face directory. Once per name and process."""
    name = parse(text)
    folder = snapshot(name, "model", WEIGHT_PATTERNS)
    if not any(folder.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing of what is read"
        raise UserError(f"{text}: the repository {name.repo} has no safetensors weights (fetched: {found}); this reads "
                        "a GPT-2 saved as config.json and model.safetensors")
    return folder


def snapshot(name: HubName, kind: str, patterns: list[str]) -> Path:
    """The repository's files that match `patterns`, at name.revision, in the cache (the folder's name is the
    commit), each file downloaded by this call checked against its checksum. Works offline (HF_HUB_OFFLINE=1)
    from what an earlier call cached."""
    from huggingface_hub import snapshot_download

    # It warns "No files matched allow_patterns=[...]" for a dataset without a card (README.md) and a model without
    # safetensors: the callers read the first as configs inferred from the files' names, and say the second.
    logging.getLogger("huggingface_hub._snapshot_download").addFilter(_no_match_is_for_the_caller)
    before = _blobs(name, kind)
    with hub_errors(name, kind):
        folder = Path(snapshot_download(name.repo, repo_type=kind, revision=name.revision, allow_patterns=patterns))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.resolve().name not in before:
            check_blob(path, name, path.relative_to(folder).as_posix())
    return folder


def _no_match_is_for_the_caller(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No files matched")


def fetch_file(name: HubName, kind: str, path: str, commit: str) -> Path:
    """One file of a repository at a commit, in the cache: downloaded once (a second call makes no request) and
    then checked against the checksum the Hub gave for it."""
    from huggingface_hub import hf_hub_download

    before = _blobs(name, kind)
    with hub_errors(name, kind):
        local = Path(hf_hub_download(name.repo, path, repo_type=kind, revision=commit))
    if local.resolve().name not in before:
        check_blob(local, name, path)
    return local


def _blobs(name: HubName, kind: str) -> set[str]:
    """The blobs the cache holds for a repository (huggingface_hub's layout: <kind>s--OWNER--NAME/blobs/<etag>)."""
    folder = Path(cache_dir()) / f"{kind}s--{name.repo.replace('/', '--')}" / "blobs"
    return set(os.listdir(folder)) if folder.is_dir() else set()


def check_blob(local: Path, name: HubName, path: str) -> None:
    """The cache names each blob by the ETag the Hub sent: the SHA-256 of a large (LFS) file, the git blob SHA-1 of a
    small one. huggingface_hub checks only a download's size; this checks its content. A file that does not match
    is deleted, so that the next run downloads it again."""
    blob = local.resolve()
    expected = blob.name
    if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", expected):
        return
    digest = hashlib.sha256() if len(expected) == 64 else hashlib.sha1(b"blob %d\0" % blob.stat().st_size)
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        forget(local)
        kind = "SHA-256" if len(expected) == 64 else "git SHA-1"
        raise UserError(f"{name.text}: '{path}' does not match its checksum ({kind} {digest.hexdigest()[:12]}..., "
                        f"expected {expected[:12]}...); it was deleted: run the same command again to download it "
                        "again")


def forget(local: Path) -> None:
    """Removes a file fetched into the cache: its blob and the snapshot's link to it (the next fetch downloads it
    again). What --delete-downloads does once a file is tokenized."""
    blob = local.resolve()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(blob)
    if local.is_symlink() or local.exists():
        os.unlink(local)


def cached_file(name: HubName, kind: str, path: str, commit: str) -> Path | None:
    """The cached copy of a repository's file at a commit, without a request; None if it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(name.repo, path, revision=commit, repo_type=kind)
    return Path(found) if isinstance(found, str) else None


def commit_of(folder: Path) -> str:
    """The commit of a snapshot folder (the cache names it so)."""
    if not _COMMIT.fullmatch(folder.name):
        raise UserError(f"'{folder}' is not a snapshot of the Hugging Face cache")
    return folder.name
