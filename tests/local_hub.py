"""A small in-memory Hugging Face hub on 127.0.0.1, speaking what huggingface_hub 2.4 needs.

Endpoints (as built by `HfApi.model_info` and `hf_hub_download`):

- `GET /api/models/{repo_id}[/revision/{revision}][?blobs=True]`: model info JSON; `sha` is the
  commit, `siblings[]` has `rfilename`, plus `size`, `blobId` and `lfs{size,sha256,pointerSize}`
  when `blobs=True` (files_metadata).
- `HEAD|GET /{repo_id}/resolve/{revision}/{path}`: the file. Headers as on the hub: `X-Repo-Commit`,
  `ETag` (git blob id, or sha256 for LFS files), `X-Linked-Etag` + `X-Linked-Size` for LFS files,
  `Content-Length`; GET honours `Range: bytes=a-[b]` (used when huggingface_hub resumes).
  No redirects: the hub redirects LFS files to a CDN, but the client needs the same headers either way.

Errors carry `X-Error-Code` / `X-Error-Message` like the hub, which is what huggingface_hub uses to
pick its exception class: RepoNotFound and RevisionNotFound (404), EntryNotFound (404), and 401
"Invalid username or password." without a token / "Invalid credentials in Authorization header"
with a wrong one. The revision segment is percent-encoded by the client (`refs%2Fpr%2F1`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")


def git_blob_sha1(content: bytes) -> str:
    """Git object id of a blob: sha1(b"blob <size>\\0" + content)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class _File:
    content: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def pointer(self) -> bytes:
        """The git-lfs pointer file stored in git in place of an LFS file's content."""
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.content)}\n").encode()

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(self.pointer if self.lfs else self.content)


@dataclass
class _Repo:
    commits: dict[str, dict[str, _File]] = field(default_factory=dict)  # commit sha -> tree
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    token: str | None = None  # when set, requests must send "Authorization: Bearer <token>"
    corrupted: set[str] = field(default_factory=set)  # paths served with wrong bytes


@dataclass(frozen=True)
class LoggedRequest:
    """One request the hub answered. The token itself is never recorded."""

    method: str
    path: str  # URL path as sent (percent-encoded)
    query: str
    status: int
    authorized: bool  # an Authorization header was present


class LocalHub:
    """In-memory repos served over HTTP; see the module docstring for the protocol.

    Attributes:
        endpoint: "http://127.0.0.1:PORT", to pass as `endpoint=`.
        requests: every answered request, in order.
    """

    def __init__(self) -> None:
        self._repos: dict[str, _Repo] = {}
        self._lock = threading.Lock()
        self._failures: list[tuple[int, str | None]] = []  # (status, method or None) to inject
        self.requests: list[LoggedRequest] = []
        self.echo_authorization = False  # error answers quote the Authorization header (a hostile hub)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    # ---- test knobs ------------------------------------------------------------------------------

    def add_commit(self, repo_id: str, files: dict[str, bytes | None], branch: str = "main",
                   lfs: Iterable[str] = ("model.safetensors",)) -> str:
        """Commit `files` on top of `branch` (created if new; None deletes a path); return the sha.

        The sha is deterministic: sha1 of the repo id, the parent commit and the new tree.
        """
        lfs = set(lfs)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo())
            parent = repo.refs.get(branch, "")
            tree = dict(repo.commits[parent]) if parent else {}
            for path, content in files.items():
                if content is None:
                    tree.pop(path, None)
                else:
                    tree[path] = _File(content, path in lfs)
            listing = "".join(f"{p}\0{f.blob_id}\n" for p, f in sorted(tree.items()))
            commit = hashlib.sha1(f"{repo_id}\0{parent}\0{listing}".encode()).hexdigest()
            repo.commits[commit] = tree
            repo.refs[branch] = commit
            return commit

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        """Point tag `name` at `commit`."""
        with self._lock:
            self._repos[repo_id].refs[name] = commit

    def require_token(self, repo_id: str, token: str) -> None:
        """Make `repo_id` private: 401 unless the request sends this token."""
        with self._lock:
            self._repos[repo_id].token = token

    def corrupt(self, repo_id: str, path: str) -> None:
        """Serve different bytes of the same size for `path` (metadata and headers unchanged)."""
        with self._lock:
            self._repos[repo_id].corrupted.add(path)

    def fail_next(self, n: int, status: int = 503, method: str | None = None) -> None:
        """Answer the next `n` requests (only those with `method`, if given) with `status`."""
        with self._lock:
            self._failures.extend([(status, method)] * n)

    def file_requests(self) -> list[LoggedRequest]:
        """The requests for file contents or metadata (`/resolve/`)."""
        return [r for r in self.requests if "/resolve/" in r.path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- request handling ------------------------------------------------------------------------

    def _answer(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        auth = h.headers.get("Authorization")
        with self._lock:
            status, headers, body = self._route(h.command, url.path, url.query, auth, h.headers.get("Range"))
            self.requests.append(LoggedRequest(h.command, url.path, url.query, status, auth is not None))
            if status >= 400 and self.echo_authorization:  # a careless server or proxy quoting the request
                message = f"{headers.get('X-Error-Message', '')} (request had Authorization: {auth})"
                status, headers, body = _error(status, headers.get("X-Error-Code", ""), message)
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name, value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "GET":
            h.wfile.write(body)

    def _route(self, method: str, path: str, query: str, auth: str | None,
               range_header: str | None) -> tuple[int, dict[str, str], bytes]:
        for i, (status, only) in enumerate(self._failures):
            if only is None or only == method:
                del self._failures[i]
                return _error(status, "Injected", f"injected failure {status}")
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            repo_raw, _, rev_raw = rest.partition("/revision/")
            kind, revision, file_raw = "info", unquote(rev_raw) if rev_raw else "main", ""
        elif "/resolve/" in path:
            repo_raw, _, rest = path[1:].partition("/resolve/")
            rev_raw, _, file_raw = rest.partition("/")
            kind, revision = "file", unquote(rev_raw)
        else:
            return _error(404, "", "Not Found")
        repo = self._repos.get(unquote(repo_raw))
        if repo is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if repo.token is not None and auth != f"Bearer {repo.token}":
            if auth is None:  # what the hub says to anonymous requests for private repos
                return _error(401, "RepoNotFound", "Invalid username or password.")
            return _error(401, "", "Invalid credentials in Authorization header")
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        tree = repo.commits[commit]
        if kind == "info":
            blobs = parse_qs(query).get("blobs", ["false"])[0].lower() == "true"
            return 200, {"Content-Type": "application/json"}, _model_info(unquote(repo_raw), commit, tree, blobs,
                                                                          private=repo.token is not None)
        file_path = unquote(file_raw)
        entry = tree.get(file_path)
        if entry is None:
            status, headers, body = _error(404, "EntryNotFound", f"{file_path} does not exist on {revision}")
            return status, {**headers, "X-Repo-Commit": commit}, body
        content = entry.content
        if file_path in repo.corrupted:
            content = bytes(b ^ 0xFF for b in content)  # same size, different bytes
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry.lfs:
            headers |= {"ETag": f'"{entry.sha256}"', "X-Linked-Etag": f'"{entry.sha256}"',
                        "X-Linked-Size": str(len(entry.content))}
        else:
            headers["ETag"] = f'"{entry.blob_id}"'
        match = _RANGE_RE.fullmatch(range_header or "") if method == "GET" else None
        if match:
            start = int(match[1])
            end = int(match[2]) if match[2] else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return 206, headers, content[start:end + 1]
        return 200, headers, content


def _model_info(repo_id: str, commit: str, tree: dict[str, _File], blobs: bool, private: bool) -> bytes:
    siblings = []
    for path, f in sorted(tree.items()):
        sibling: dict[str, object] = {"rfilename": path}
        if blobs:
            sibling |= {"size": len(f.content), "blobId": f.blob_id}
            if f.lfs:
                sibling["lfs"] = {"size": len(f.content), "sha256": f.sha256, "pointerSize": len(f.pointer)}
        siblings.append(sibling)
    info = {"_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "sha": commit, "private": private, "gated": False, "disabled": False, "tags": [],
            "siblings": siblings}
    return json.dumps(info).encode()


def _error(status: int, code: str, message: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, headers, json.dumps({"error": message}).encode()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._handle()

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle()

    def _handle(self) -> None:
        self.server.hub._answer(self)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        pass


@pytest.fixture
def local_hub() -> Iterator[LocalHub]:
    """A running `LocalHub` with no repos; shut down after the test."""
    hub = LocalHub()
    try:
        yield hub
    finally:
        hub.close()
