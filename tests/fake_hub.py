"""A stand-in for the Hugging Face Hub on 127.0.0.1, so that the tests run the same library code paths as a user
online (huggingface_hub's snapshot_download, hf_hub_download, HfApi) without the internet.

It speaks the routes huggingface_hub 2.4 uses (read in its file_download.py, _snapshot_download.py, hf_api.py and
utils/_http.py):

    GET  /api/{models,datasets}/REPO[/revision/REV]          -> {"id", "sha", "siblings"}
    GET  /api/{models,datasets}/REPO/tree/REV[/PATH]?recursive=...  -> [{"type", "path", "size", "oid"[, "lfs"]}]
    HEAD/GET /[datasets/]REPO/resolve/REV/PATH              -> the file, with X-Repo-Commit, ETag (the SHA-256 of a
         large file, as the Hub's LFS files; the git blob SHA-1 of a small one), Content-Length, Accept-Ranges;
         a Range request gets 206
    404s carry X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound, as huggingface_hub maps them

and, beside the Hub, plain files at any other path (`serve_file`: HellaSwag's JSONL as raw.githubusercontent.com
serves it). Faults are injected per file (`fail`: an HTTP status; `cut`: the connection closed at a byte offset),
and every request is logged (`requests`), so that a test can say which files a run fetched.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 1024  # files at least this large are served as the Hub serves LFS files (ETag: their SHA-256)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    access: str = "public"  # public | token:VALUE (401 without it) | gated | forbidden


@dataclass
class Fault:
    suffix: str  # the request path ends with this
    status: int | None = None  # answer this status
    code: str | None = None  # with this X-Error-Code
    cut_at: int | None = None  # or close the connection once this byte of the file is reached
    corrupt: bool = False  # or send the file with its last byte changed (same length, same ETag)
    times: int = 1_000_000  # how many requests it affects


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    status: int


class FakeHub:
    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.files: dict[str, bytes] = {}
        self.faults: list[Fault] = []
        self.log: list[Request] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FakeHub:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- content ---

    def add_commit(self, kind: str, repo_id: str, files: dict[str, bytes], access: str = "public") -> str:
        """A new commit of `repo_id` ('model' or 'dataset') holding `files`; main moves to it. Returns its sha."""
        repo = self.repos.setdefault((kind, repo_id), Repo())
        repo.access = access
        digest = hashlib.sha1(repo_id.encode() + b"".join(
            path.encode() + hashlib.sha256(data).digest() for path, data in sorted(files.items())))
        sha = digest.hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs["main"] = sha
        return sha

    def serve_file(self, path: str, data: bytes) -> str:
        """A plain file at `path` (no Hub headers); returns its URL."""
        self.files[path] = data
        return self.url + path

    # --- faults and the log ---

    def fail(self, suffix: str, status: int, code: str | None = None, times: int = 1_000_000) -> None:
        self.faults.append(Fault(suffix, status=status, code=code, times=times))

    def corrupt(self, suffix: str, times: int = 1_000_000) -> None:
        self.faults.append(Fault(suffix, corrupt=True, times=times))

    def cut(self, suffix: str, at: int, times: int = 1_000_000) -> None:
        self.faults.append(Fault(suffix, cut_at=at, times=times))

    def heal(self) -> None:
        self.faults.clear()

    def requests(self, since: int = 0, method: str | None = None) -> list[Request]:
        with self.lock:
            return [r for r in self.log[since:] if method is None or r.method == method]

    def fetched(self, since: int = 0) -> list[str]:
        """The files whose content was sent (GET of /resolve/), in order."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests(since, "GET")
                if "/resolve/" in r.path and r.status in (200, 206)]

    def _fault(self, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if path.endswith(fault.suffix) and fault.times > 0:
                    fault.times -= 1
                    return fault
        return None


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # the request log is hub.log, not stderr
            pass

        def do_HEAD(self):
            self._answer(head=True)

        def do_GET(self):
            self._answer(head=False)

        def _answer(self, head: bool):
            split = urlsplit(self.path)
            path, query = unquote(split.path), parse_qs(split.query)
            self.fault = hub._fault(path)
            self.logged_path = path
            if self.fault is not None and self.fault.status is not None:
                self._error(self.fault.status, self.fault.code, "injected")
            else:
                self._route(path, query, head)

        def send_response(self, code, message=None):
            # Logged before a byte of the answer leaves: a client that has its answer finds its request in hub.log.
            with hub.lock:
                hub.log.append(Request(self.command, self.logged_path, self.headers.get("Range"), code))
            super().send_response(code, message)

        def _route(self, path: str, query: dict, head: bool) -> int:
            if path in hub.files:
                return self._send(200, hub.files[path], head=head)
            if path.startswith("/api/models/") or path.startswith("/api/datasets/"):
                return self._api(path, query)
            kind = "model"
            if path.startswith("/datasets/"):
                kind, path = "dataset", path[len("/datasets"):]
            if "/resolve/" in path:
                repo_id, rest = path[1:].split("/resolve/", 1)
                revision, _, file_path = rest.partition("/")
                return self._resolve(kind, repo_id, revision, file_path, head)
            return self._error(404, None, "not a route of this Hub")

        # --- the API ---

        def _api(self, path: str, query: dict) -> int:
            kind = "model" if path.startswith("/api/models/") else "dataset"
            rest = path.split("/", 3)[3]
            parts = rest.split("/")
            repo_id, tail = "/".join(parts[:2]), parts[2:]
            revision, tree_path = "main", None
            if tail[:1] == ["revision"]:
                revision = "/".join(tail[1:])
            elif tail[:1] == ["tree"]:
                revision, tree_path = tail[1], "/".join(tail[2:])
            elif tail:
                return self._error(404, None, "unknown API route")
            found = self._commit(kind, repo_id, revision)
            if isinstance(found, int):
                return found
            sha, files = found
            if tree_path is None:
                body = {"id": repo_id, "sha": sha, "siblings": [{"rfilename": p} for p in sorted(files)]}
                return self._send(200, json.dumps(body).encode(), content_type="application/json")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._send(200, json.dumps(_tree(files, tree_path, recursive)).encode(),
                              content_type="application/json")

        def _commit(self, kind: str, repo_id: str, revision: str):
            repo = hub.repos.get((kind, repo_id))
            if repo is None:
                return self._error(404, "RepoNotFound", "Repository not found")
            refused = self._refused(repo)
            if refused:
                return refused
            sha = repo.refs.get(revision, revision if revision in repo.commits else None)
            if sha is None:
                return self._error(404, "RevisionNotFound", "Invalid rev id")
            return sha, repo.commits[sha]

        def _refused(self, repo: Repo) -> int | None:
            if repo.access.startswith("token:"):
                if self.headers.get("Authorization") != f"Bearer {repo.access[len('token:'):]}":
                    return self._error(401, "RepoNotFound", "Invalid username or password.")
            elif repo.access == "gated":
                return self._error(403, "GatedRepo", "Access to this repo is restricted")
            elif repo.access == "forbidden":
                return self._error(403, None, "Forbidden")
            return None

        # --- files ---

        def _resolve(self, kind: str, repo_id: str, revision: str, file_path: str, head: bool) -> int:
            found = self._commit(kind, repo_id, revision)
            if isinstance(found, int):
                return found
            sha, files = found
            if file_path not in files:
                return self._error(404, "EntryNotFound", "Entry not found", commit=sha)
            data = files[file_path]
            etag = hashlib.sha256(data).hexdigest() if len(data) >= LFS_THRESHOLD else git_blob_sha1(data)
            return self._send(200, data, head=head, headers={"X-Repo-Commit": sha, "ETag": f'"{etag}"'})

        # --- sending ---

        def _send(self, status: int, data: bytes, *, head: bool = False, headers: dict | None = None,
                  content_type: str = "application/octet-stream") -> int:
            fault = self.fault
            if fault is not None and fault.corrupt and not head:
                data = data[:-1] + bytes([data[-1] ^ 1])
            start, end = 0, len(data)
            ranged = self.headers.get("Range")
            if ranged and not head and ranged.startswith("bytes="):
                first, _, last = ranged[len("bytes="):].partition("-")
                start = int(first)
                end = int(last) + 1 if last else len(data)
                status = 206
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if head:
                return status
            if fault is not None and fault.cut_at is not None and start <= fault.cut_at < end:
                self.wfile.write(data[start:fault.cut_at])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the client sees the body end early
                return status
            self.wfile.write(data[start:end])
            return status

        def _error(self, status: int, code: str | None, message: str, commit: str | None = None) -> int:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return status

    return Handler


def _tree(files: dict[str, bytes], under: str, recursive: bool) -> list[dict]:
    """The /tree listing: the files (and folders) under `under`, with the fields RepoFile and RepoFolder read."""
    prefix = f"{under.strip('/')}/" if under.strip("/") else ""
    entries, folders = [], set()
    for path in sorted(files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            folders.add(prefix + rest.split("/", 1)[0])
            continue
        parts = path.split("/")
        folders.update("/".join(parts[:i]) for i in range(len(prefix.split("/")), len(parts)) if recursive)
        data = files[path]
        entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        if len(data) >= LFS_THRESHOLD:
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        entries.append(entry)
    entries += [{"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0}
                for folder in sorted(f for f in folders if f and f != prefix.rstrip("/"))]
    return entries


def environ(hub: FakeHub, home) -> dict[str, str]:
    """The environment a subprocess needs to use `hub` as its Hub and `home` as HF_HOME (huggingface_hub reads it at
    import), with no token of the user's and no telemetry."""
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": "",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def use_in_process(monkeypatch, hub_url: str, home, offline: bool = False) -> None:
    """What environ() does, for huggingface_hub already imported in this process: it read HF_ENDPOINT, HF_HOME
    and HF_HUB_OFFLINE into its constants at import, so the constants themselves are patched."""
    import os

    from huggingface_hub import constants

    home = str(home)
    for name, value in (("ENDPOINT", hub_url), ("HUGGINGFACE_CO_URL_TEMPLATE", hub_url +
                        "/{repo_id}/resolve/{revision}/{filename}"), ("HF_HOME", home),
                        ("HF_HUB_CACHE", os.path.join(home, "hub")),
                        ("HF_ASSETS_CACHE", os.path.join(home, "assets")),
                        ("HF_TOKEN_PATH", os.path.join(home, "token")),
                        ("HF_STORED_TOKENS_PATH", os.path.join(home, "stored_tokens")), ("HF_HUB_OFFLINE", offline),
                        ("HF_HUB_DISABLE_TELEMETRY", True), ("HF_HUB_DISABLE_PROGRESS_BARS", True)):
        monkeypatch.setattr(constants, name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
