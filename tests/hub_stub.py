"""A loopback stand-in for the Hugging Face Hub HTTP API, for tests that must not touch the network.

`LocalHub` is a real HTTP server (`http.server.ThreadingHTTPServer` on 127.0.0.1, ephemeral port, daemon thread)
holding git-like repos in memory. The real `huggingface_hub` client (and therefore `transformers` and `peft`, which
download through it) talks to it once it is pointed at `LocalHub.endpoint`; the `local_hub` pytest fixture does that.

Usage::

    from hub_stub import local_hub_fixture  # registers the `local_hub` fixture (noqa F401 for ruff)

    def test_push(local_hub, tmp_path):  # local_hub: a running LocalHub, huggingface_hub pointed at it
        HfApi(token="hf_test_token").create_repo("tester/demo")  # user "tester" owns namespace "tester"
        ...
        assert local_hub.files("tester/demo")["config.json"] == b"..."

    # Other users / tokens: start a hub yourself and point the client at it.
    with LocalHub(tokens={"hf_a": "alice", "hf_b": "bob"}) as hub:
        use_local_hub(monkeypatch, hub.endpoint, tmp_path / "hf_home")

`use_local_hub` sets HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0, HF_HUB_DISABLE_TELEMETRY=1 and a temporary
HF_HOME / HF_HUB_CACHE / HF_ASSETS_CACHE / HF_XET_CACHE / HF_TOKEN_PATH, removes HF_TOKEN (and the other token and
offline variables), adds 127.0.0.1 to NO_PROXY, and patches what `huggingface_hub` computed from the environment at
import time: `constants.ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, `HF_URL_HOSTS`, `HF_HUB_OFFLINE`,
`HF_HUB_DISABLE_XET`, `HF_HUB_DISABLE_TELEMETRY`, the cache / token paths, the endpoint of the module-level `HfApi`
behind `huggingface_hub.file_exists` & co, the Hub origins allowed to receive the token, transformers' cached HfApi,
and it closes the shared HTTP session. All of it is undone by `monkeypatch`.

What it covers (the requests `huggingface_hub` 2.4 sends for these calls, checked against its source):

* auth: `Authorization: Bearer <token>` is looked up in `tokens` (token -> user name). An unknown token is refused
  with 401 on every route, as the Hub does. Writes need a known token (401 otherwise) and may only target the
  caller's own namespace (403 otherwise). Public repos are readable anonymously; private repos only by their owner
  (404 `RepoNotFound` for anybody else, like the Hub). Error bodies are `{"error": "..."}` plus the `X-Error-Code` /
  `X-Error-Message` headers, so the client raises its usual `HfHubHTTPError` subclasses with the server message.
* `whoami` (GET /api/whoami-v2), `create_repo` (POST /api/repos/create, 409 when it exists so `exist_ok` works,
  `private`/`visibility`), `delete_repo` (DELETE /api/repos/delete), README front-matter validation
  (POST /api/validate-yaml).
* repo info: GET /api/{models,datasets}/{repo_id}[/revision/{rev}] with `sha`, `siblings` (sizes and blob ids with
  `blobs=true`), `private`, `cardData` (parsed README front matter), `lastModified`/`createdAt`.
* `list_repo_files` / `list_repo_tree` (GET .../tree/{rev}[/{path}], recursive or not, `expand` adds `lastCommit`),
  `get_paths_info` (POST .../paths-info/{rev}), `list_repo_refs` (GET .../refs).
* `create_commit` / `upload_file` / `upload_folder`: POST .../preupload/{rev} answers "regular" for every file (never
  LFS) with the remote blob oid, so unchanged files are skipped client-side; POST .../commit/{rev} applies the NDJSON
  `header`, `file` (base64), `deletedFile` and `deletedFolder` operations, honours `parentCommit` (412 on mismatch)
  and `create_pr=1` (opens `refs/pr/N`, returns `pullRequestUrl`). Every write and read takes the revision from the
  URL, so commits to a branch leave `main` alone and downloads at a branch see that branch's files.
* branches: `create_branch` (POST .../branch/{name}, optional `startingPoint` revision, default the head of `main`;
  409 when it exists so `exist_ok` works; 400 for a `refs/...` name or one that looks like a commit id) and
  `delete_branch` (DELETE .../branch/{name}; 403 for `main`, 404 when missing). Branch names may contain `/`
  (the client sends them as one `%2F`-quoted segment).
* downloads: GET and HEAD /[datasets/]{repo_id}/resolve/{rev}/{path} with `ETag` (git blob sha1), `X-Repo-Commit`,
  `Content-Length`, `Accept-Ranges` and single-range `Range` requests (206), 404 `EntryNotFound`/`RevisionNotFound`/
  `RepoNotFound` the way the client expects. This is what `hf_hub_download`, `snapshot_download`, `file_exists`,
  `ModelCard.load` and `PeftModel.from_pretrained(base, "user/repo")` use.
* like the Hub, a new repo starts with one commit holding a `.gitattributes` file (`files()` shows it).

Known differences from the Hub: a write to another namespace is a 403 even when the target repo is private or does
not exist (the Hub may answer 404 there); preupload never asks for LFS, whatever the file size.

What it does not cover: Xet and LFS transfers (the client must run with Xet disabled, which `local_hub` arranges),
Spaces, organizations, gated repos, tags, discussions, pagination (every listing is one page), canonical repo ids without a namespace (`gpt2`), the
`/api/models` search listing, and everything else (inference, jobs, buckets, ...). Any route it does not know gets a
404 `{"error": "LocalHub: no route for ..."}`, is logged at WARNING level and recorded in `LocalHub.unknown_routes`.
The request log (`LocalHub.requests`, and DEBUG logging) holds method, path and status only, never headers, so
tokens are never logged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
import yaml

logger = logging.getLogger("hub_stub")

DEFAULT_TOKENS: dict[str, str] = {"hf_test_token": "tester"}

# URL segment after /api/ -> repo type, and repo type -> prefix in web / resolve URLs.
_API_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/"}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_FRONT_MATTER_RE = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)

# Shortened version of the `.gitattributes` file the Hub puts in the initial commit of every new repo.
_INITIAL_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1 of `data`, i.e. `git hash-object` (what the Hub uses as ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _front_matter(text: str) -> Any:
    """The parsed YAML front matter of a README (None when there is none). Raises `yaml.YAMLError` when invalid."""
    match = _FRONT_MATTER_RE.match(text)
    return yaml.safe_load(match.group(1)) if match else None


class HubError(Exception):
    """An error answer: HTTP status, message (`{"error": message}` body and `X-Error-Message`), optional code."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), dict(headers or {}))


def _error_response(err: HubError) -> _Response:
    headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode("ascii"), **err.headers}
    if err.code is not None:
        headers["X-Error-Code"] = err.code
    return _json_response({"error": err.message}, err.status, headers)


@dataclass
class _Commit:
    oid: str
    title: str
    description: str
    date: str
    parent: str | None
    files: dict[str, bytes]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # "main", "refs/pr/1", ... -> commit oid
    commits: dict[str, _Commit] = field(default_factory=dict)
    pr_count: int = 0

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]


class LocalHub:
    """In-memory Hub served over HTTP on 127.0.0.1. Use as a context manager (or call `start()` / `stop()`).

    Args:
        tokens: token -> user name. Defaults to `{"hf_test_token": "tester"}`.
    """

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self.tokens: dict[str, str] = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status); never headers
        self.unknown_routes: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._commit_counter = 0

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.close_open_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- inspection helpers for tests ------------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Snapshot of the repo files at `revision` (a branch name or commit oid): path -> content.

        Raises `KeyError` for an unknown repo or revision.
        """
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on this LocalHub")
            try:
                return dict(self._commit(repo, revision).files)
            except HubError as err:
                raise KeyError(f"no revision {revision!r} in {repo_type} repo {repo_id!r}") from err

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(repo_id for (kind, repo_id) in self._repos if kind == repo_type)

    # -- repo model ------------------------------------------------------------------------------------------------

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, bytes], title: str, description: str
    ) -> str:
        self._commit_counter += 1
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{self._commit_counter}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
        oid = digest.hexdigest()
        repo.commits[oid] = _Commit(oid, title, description, _now(), parent, dict(files))
        return oid

    def _resolve(self, repo: _Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _commit(self, repo: _Repo, revision: str) -> _Commit:
        return repo.commits[self._resolve(repo, revision)]

    def _last_commit(self, repo: _Repo, head: _Commit, path: str) -> _Commit:
        """Latest commit (first-parent walk from `head`) that changed `path` (file, or any file below a folder)."""

        def view(commit: _Commit) -> dict[str, bytes]:
            return {p: c for p, c in commit.files.items() if p == path or p.startswith(path + "/")}

        current = head
        while current.parent is not None:
            parent = repo.commits[current.parent]
            if view(parent) != view(current):
                return current
            current = parent
        return current

    def _url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def track(self, connection: socket.socket, alive: bool) -> None:
        with self._connections_lock:
            if alive:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_open_connections(self) -> None:
        """Close idle keep-alive connections so their handler threads end now, not at their read timeout."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 30  # seconds an idle keep-alive connection is kept
    server: _Server

    # -- plumbing --------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms each.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection, alive=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, alive=False)

    def log_message(self, format: str, *args: Any) -> None:
        # The base class logs the request line to stderr; we log method/path/status ourselves in `_dispatch`.
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(split.query, keep_blank_values=True).items()}
        self.body = self._read_body()
        # Split the raw path first so that %2F inside one segment (e.g. revision "refs%2Fpr%2F1") stays in it.
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            with hub._lock:
                response = self._route(method, segments)
        except HubError as err:
            response = _error_response(err)
        except Exception as err:  # a bug in the stub: answer 500 (the client retries those) and say why
            logger.exception("LocalHub: error while handling %s %s", method, split.path)
            response = _error_response(HubError(500, f"LocalHub internal error: {type(err).__name__}: {err}"))
        with hub._lock:
            hub.requests.append((method, split.path, response.status))
        logger.debug("LocalHub %s %s -> %d", method, split.path, response.status)
        self.send_response(response.status)
        for key, value in {"Content-Type": "application/json; charset=utf-8", **response.headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD" and response.body:
            self.wfile.write(response.body)

    def _json_body(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    # -- auth ------------------------------------------------------------------------------------------------------

    def _user(self) -> str | None:
        """User behind the bearer token; None when anonymous. An unknown token is a 401, like on the Hub."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.server.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _writer(self, namespace: str, forbidden: str) -> str:
        """The authenticated caller, who must own `namespace`: 401 when anonymous, 403 (`forbidden`) otherwise."""
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        if user != namespace:
            raise HubError(403, forbidden)
        return user

    def _readable_repo(self, repo_type: str, repo_id: str) -> _Repo:
        user = self._user()
        repo = self.server.hub._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and user != repo.namespace):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_type: str, repo_id: str) -> _Repo:
        self._writer(repo_id.split("/", 1)[0], f"You don't have the rights to write to the {repo_type} repo {repo_id}")
        return self._readable_repo(repo_type, repo_id)

    # -- routing ---------------------------------------------------------------------------------------------------

    def _route(self, method: str, s: list[str]) -> _Response:
        if s[:1] == ["api"]:
            rest = s[1:]
            if rest == ["whoami-v2"] and method == "GET":
                return self._whoami()
            if rest == ["repos", "create"] and method == "POST":
                return self._create_repo()
            if rest == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo()
            if rest == ["validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if len(rest) >= 3 and rest[0] in _API_REPO_TYPES and all(rest[1:3]):
                repo_type, repo_id, tail = _API_REPO_TYPES[rest[0]], f"{rest[1]}/{rest[2]}", rest[3:]
                routed = self._route_repo_api(method, repo_type, repo_id, tail)
                if routed is not None:
                    return routed
        else:
            repo_type = "dataset" if s[:1] == ["datasets"] else "model"
            parts = s[1:] if repo_type == "dataset" else s
            if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD") and all(parts[:2]):
                return self._resolve_file(repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        path = "/" + "/".join(quote(seg, safe="") for seg in s)
        self.server.hub.unknown_routes.append(f"{method} {path}")
        logger.warning("LocalHub: no route for %s %s", method, path)
        raise HubError(404, f"LocalHub: no route for {method} {path}")

    def _route_repo_api(self, method: str, repo_type: str, repo_id: str, tail: list[str]) -> _Response | None:
        if method == "GET" and not tail:
            return self._repo_info(repo_type, repo_id, "main")
        if method == "GET" and len(tail) == 2 and tail[0] == "revision":
            return self._repo_info(repo_type, repo_id, tail[1])
        if method == "GET" and len(tail) >= 2 and tail[0] == "tree":
            return self._tree(repo_type, repo_id, tail[1], "/".join(tail[2:]).strip("/"))
        if method == "GET" and tail == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method == "POST" and len(tail) == 2 and tail[0] == "paths-info":
            return self._paths_info(repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
            return self._preupload(repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "commit":
            return self._commit(repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "branch":
            return self._create_branch(repo_type, repo_id, tail[1])
        if method == "DELETE" and len(tail) == 2 and tail[0] == "branch":
            return self._delete_branch(repo_type, repo_id, tail[1])
        return None

    # -- account / repo management ---------------------------------------------------------------------------------

    def _whoami(self) -> _Response:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid username or password.")
        return _json_response(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "isPro": False,
                "canPay": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "LocalHub token", "role": "write"}},
            }
        )

    def _repo_type_from_payload(self, payload: dict) -> str:
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise HubError(400, f"LocalHub only supports model and dataset repos, not {repo_type!r}")
        return repo_type

    def _create_repo(self) -> _Response:
        hub = self.server.hub
        payload = self._json_body()
        repo_type = self._repo_type_from_payload(payload)
        name = payload.get("name") or ""
        user = self._user()
        namespace = payload.get("organization") or user
        if namespace is None:
            raise HubError(401, "Invalid username or password.")
        self._writer(namespace, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        if not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        existing = hub._repos.get((repo_type, repo_id))
        if existing is not None:
            return _json_response(
                {"error": f"You already created this {repo_type} repo", "url": hub._url(existing)}, status=409
            )
        private = payload.get("visibility") == "private" or payload.get("private") is True
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        repo.branches["main"] = hub._new_commit(
            repo, None, {".gitattributes": _INITIAL_GITATTRIBUTES}, "initial commit", ""
        )
        hub._repos[(repo_type, repo_id)] = repo
        return _json_response({"url": hub._url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> _Response:
        hub = self.server.hub
        payload = self._json_body()
        repo_type = self._repo_type_from_payload(payload)
        user = self._user()
        namespace = payload.get("organization") or user or ""
        repo_id = f"{namespace}/{payload.get('name') or ''}"
        self._writable_repo(repo_type, repo_id)
        del hub._repos[(repo_type, repo_id)]
        return _json_response({})

    def _validate_yaml(self) -> _Response:
        self._user()  # an unknown token is still a 401
        content = self._json_body().get("content") or ""
        try:
            metadata = _front_matter(content)
        except yaml.YAMLError as err:
            return _json_response({"errors": [{"message": f"Invalid YAML: {err}"}], "warnings": []}, status=400)
        if metadata is not None and not isinstance(metadata, dict):
            return _json_response({"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []}, 400)
        return _json_response({"errors": [], "warnings": []})

    # -- reads -----------------------------------------------------------------------------------------------------

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.server.hub._commit(repo, revision)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=len(commit.files[path]), blobId=git_blob_oid(commit.files[path]))
            siblings.append(sibling)
        card_data = None
        if "README.md" in commit.files:
            try:
                card_data = _front_matter(commit.files["README.md"].decode("utf-8", "replace"))
            except yaml.YAMLError:
                card_data = None
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo_type}/{repo_id}".encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(content) for content in commit.files.values()),
        }
        if isinstance(card_data, dict):
            info["cardData"] = card_data
            if repo_type == "model" and card_data.get("library_name"):
                info["library_name"] = card_data["library_name"]
        if repo_type == "model":
            info["modelId"] = repo_id
        return _json_response(info)

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict[str, Any] | None:
        """A tree / paths-info entry for a file or folder at `commit`, or None when `path` does not exist."""
        if path in commit.files:
            content = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": git_blob_oid(content), "size": len(content), "path": path}
        else:
            below = sorted(p for p in commit.files if p.startswith(path + "/"))
            if not below:
                return None
            listing = "".join(f"{p}\0{git_blob_oid(commit.files[p])}\n" for p in below)
            entry = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
        if expand:
            last = self.server.hub._last_commit(repo, commit, path)
            entry["lastCommit"] = {"id": last.oid, "title": last.title, "date": last.date}
        return entry

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.server.hub._commit(repo, revision)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        expand = self.query.get("expand", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f'{path} does not exist on "{revision}"', "EntryNotFound")
        entries: set[str] = set()
        for file_path in commit.files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, min(depth, len(parts)) + 1):
                entries.add(prefix + "/".join(parts[:i]))
        listed = [e for e in (self._entry(repo, commit, p, expand) for p in sorted(entries)) if e is not None]
        listed.sort(key=lambda e: (e["type"] != "directory", e["path"]))  # the Hub lists folders first
        return _json_response(listed)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.server.hub._commit(repo, revision)
        if "json" in (self.headers.get("Content-Type") or ""):
            payload = self._json_body()
            paths, expand = payload.get("paths") or [], bool(payload.get("expand"))
        else:
            form = parse_qs(self.body.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), (form.get("expand") or [""])[-1].lower() in ("1", "true")
        if isinstance(paths, str):
            paths = [paths]
        entries = [self._entry(repo, commit, str(p).strip("/"), expand) for p in paths]
        return _json_response([e for e in entries if e is not None])

    def _refs(self, repo_type: str, repo_id: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id)
        branches, prs = [], []
        for name, oid in sorted(repo.branches.items()):
            if name.startswith("refs/pr/"):
                prs.append({"name": name, "ref": name, "targetCommit": oid})
            else:
                branches.append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid})
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = prs
        return _json_response(payload)

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        repo = self._readable_repo(repo_type, repo_id)
        commit = self.server.hub._commit(repo, revision)
        if path not in commit.files:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        filename = path.rsplit("/", 1)[-1]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(filename)}",
        }
        byte_range = self.headers.get("Range")
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", byte_range or "")
        if byte_range and match and (match.group(1) or match.group(2)):
            size = len(content)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start, end = max(size - int(match.group(2)), 0), size - 1
            if start >= size or start > end:
                raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            return _Response(206, content[start : end + 1], headers)
        return _Response(200, content, headers)

    # -- writes ----------------------------------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        hub = self.server.hub
        repo = self._writable_repo(repo_type, repo_id)
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a JSON body with a 'files' list")
        head = hub._commit(repo, revision)
        answer = []
        for item in files:
            path = str(item.get("path", ""))
            existing = head.files.get(path)
            answer.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(existing) if existing is not None else None,
                }
            )
        return _json_response({"files": answer, "commitOid": head.oid})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> _Response:
        hub = self.server.hub
        repo = self._writable_repo(repo_type, repo_id)
        if not branch or branch.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", branch):
            raise HubError(400, f"Invalid reference for a branch: {branch}")
        _check_path(branch)  # no empty, "." or ".." component, as for git ref names
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        starting_point = str(self._json_body().get("startingPoint") or "main")
        repo.branches[branch] = hub._resolve(repo, starting_point)  # 404 RevisionNotFound for an unknown start
        return _json_response({})

    def _delete_branch(self, repo_type: str, repo_id: str, branch: str) -> _Response:
        repo = self._writable_repo(repo_type, repo_id)
        if branch == "main":
            raise HubError(403, "Cannot delete the default branch main")
        if branch not in repo.branches or branch.startswith("refs/pr/"):
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        del repo.branches[branch]
        return _json_response({})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> _Response:
        hub = self.server.hub
        repo = self._writable_repo(repo_type, repo_id)
        create_pr = self.query.get("create_pr") == "1"
        if revision not in repo.branches:
            if revision in repo.commits or re.fullmatch(r"[0-9a-f]{7,40}", revision):
                raise HubError(400, f"Cannot commit to a commit id ({revision}): use a branch name")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

        header: dict[str, Any] = {}
        operations: list[tuple[str, dict[str, Any]]] = []
        for number, line in enumerate(self.body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = str(item["key"]), dict(item["value"])
            except (ValueError, KeyError, TypeError) as err:
                raise HubError(400, f"Invalid NDJSON line {number} in commit payload") from err
            if key == "header":
                header = value
            elif key in ("file", "deletedFile", "deletedFolder"):
                operations.append((key, value))
            else:
                raise HubError(400, f"LocalHub does not support {key!r} commit operations (no LFS, no Xet)")
        summary = str(header.get("summary") or "").strip()
        if not summary:
            raise HubError(400, "Commit header with a non-empty 'summary' is required")

        head = hub._commit(repo, revision)
        parent_commit = str(header.get("parentCommit") or "")
        if parent_commit and create_pr:
            base = hub._commit(repo, parent_commit)  # a PR may start from an older commit
        elif parent_commit and not head.oid.startswith(parent_commit):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        else:
            base = head

        files = dict(base.files)
        for key, value in operations:
            path = str(value.get("path", ""))
            if key == "file":
                _check_path(path)
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {path}")
                files[path] = base64.b64decode(value.get("content", ""))
            elif key == "deletedFile":
                _check_path(path)
                if path not in files:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            else:  # deletedFolder
                folder = path.rstrip("/")
                _check_path(folder)
                doomed = [p for p in files if p.startswith(folder + "/")]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]

        oid = hub._new_commit(repo, base.oid, files, summary, str(header.get("description") or ""))
        url = hub._url(repo)
        answer: dict[str, Any] = {"success": True, "commitOid": oid, "commitUrl": f"{url}/commit/{oid}"}
        if create_pr:
            repo.pr_count += 1
            repo.branches[f"refs/pr/{repo.pr_count}"] = oid
            answer["pullRequestUrl"] = f"{url}/discussions/{repo.pr_count}"
        else:
            repo.branches[revision] = oid
        return _json_response(answer)


def _check_path(path: str) -> None:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")


# -- pointing huggingface_hub / transformers / peft at a LocalHub -----------------------------------------------------


def use_local_hub(monkeypatch: pytest.MonkeyPatch, endpoint: str, hf_home: str | os.PathLike[str]) -> None:
    """Point `huggingface_hub` (and `transformers` / `peft`, which download through it) at `endpoint`.

    Sets the environment variables for code that reads them later (and for subprocesses), and patches the values
    `huggingface_hub` already computed from them at import time. Every change is undone by `monkeypatch`.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import _http

    home = Path(hf_home)
    hub_cache = home / "hub"
    hub_cache.mkdir(parents=True, exist_ok=True)
    endpoint = endpoint.rstrip("/")

    env = {
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_OIDC_RESOURCE",
        "HUGGINGFACE_CO_STAGING",
        "TRANSFORMERS_OFFLINE",
        "HUGGINGFACE_HUB_CACHE",
        "HUGGINGFACE_ASSETS_CACHE",
    ):
        monkeypatch.delenv(name, raising=False)
    # Never send loopback traffic through a proxy.
    for name in ("NO_PROXY", "no_proxy"):
        current = os.environ.get(name)
        monkeypatch.setenv(name, f"{current},127.0.0.1,localhost" if current else "127.0.0.1,localhost")

    # Values huggingface_hub.constants computed at import time.
    host = urlsplit(endpoint).hostname or "127.0.0.1"
    patches: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_TELEMETRY": True,  # also skips the user-agent "agent harness" lookup on the Hub
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(hub_cache),
        "HUGGINGFACE_HUB_CACHE": str(hub_cache),
        "HF_ASSETS_CACHE": str(home / "assets"),
        "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    # Module-level copies made with `from ..constants import X` and the import-time origins allowed to get the token.
    for module_name, name, value in (
        ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(hub_cache)),
        ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(home / "assets")),
        ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint),
    ):
        module = sys.modules.get(module_name)
        if module is not None:
            monkeypatch.setattr(module, name, value, raising=False)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
    # `huggingface_hub.file_exists`, `.model_info`, `.create_repo`, ... are bound methods of this import-time HfApi.
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    # transformers keeps a lazily created HfApi (created with the endpoint of the time): make it start afresh.
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    # HfFileSystem instances are cached by fsspec with the endpoint they were created with.
    hf_file_system = sys.modules.get("huggingface_hub.hf_file_system")
    if hf_file_system is not None:
        hf_file_system.HfFileSystem.clear_instance_cache()
    # Start with a fresh HTTP client (no pooled connections to an older stub, proxies read from the env above).
    _http.close_session()


@pytest.fixture(name="local_hub")
def local_hub_fixture(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LocalHub]:
    """A running `LocalHub` (token "hf_test_token" for user "tester"), with huggingface_hub pointed at it.

    The Hugging Face home and cache live in `tmp_path / "hf_home"`; no token is configured, so pass
    `token="hf_test_token"` to calls that write (or `monkeypatch.setenv("HF_TOKEN", "hf_test_token")`).
    """
    from huggingface_hub.utils import _http

    with LocalHub() as hub:
        use_local_hub(monkeypatch, hub.endpoint, tmp_path / "hf_home")
        try:
            yield hub
        finally:
            _http.close_session()


# `from hub_stub import local_hub` makes the fixture available in a test module, but ruff then reports the test
# arguments named `local_hub` as redefinitions (F811). Importing `local_hub_fixture` instead, with a noqa for F401
# (unused import), registers the same fixture without that clash.
local_hub = local_hub_fixture
