"""A small Hugging Face Hub-compatible HTTP server on 127.0.0.1, for tests without network.

It answers the routes that ``huggingface_hub`` (2.x) uses to create a model repository, upload files with
the "regular" (non-LFS, non-xet) upload mode, read repository metadata and download files, so that the real
client can run create repo → upload → download end to end against it:

======================================================  ================================================
``POST /api/repos/create``                              create (``{"url": ...}``, also with 409)
``POST /api/validate-yaml``                             ``{"errors": [], "warnings": []}``
``POST /api/models/{ns}/{name}/preupload/{rev}``        every file "regular"
``POST /api/models/{ns}/{name}/commit/{rev}``           ndjson commit (header, ``file``, deletions)
``GET  /api/models/{ns}/{name}[/revision/{rev}]``       ``{"id", "sha", "siblings"}``
``GET  /api/models/{ns}/{name}/tree/{rev}[/path]``      file listing
``HEAD|GET /{ns}/{name}/resolve/{rev}/{path}``          file bytes with ``X-Repo-Commit`` and ``ETag``
======================================================  ================================================

Dataset repositories (``/api/datasets/...``, ``/datasets/{ns}/{name}/resolve/...``) are answered by the same
routes and share the store with models (enough for ``datasets.load_dataset`` of a Hub id).

Authentication rules (to test error handling): write routes need an ``Authorization: Bearer <token>``
header (401 otherwise); a token that starts with ``"invalid"`` is refused with 401; creating a repository in
the namespace ``"forbidden"`` answers 403. Missing repositories answer 404 with ``X-Error-Code: RepoNotFound``
(and ``EntryNotFound`` / ``RevisionNotFound`` for files and revisions), as the real Hub does.

Run it in a thread with :class:`HubServer` (``with HubServer() as hub: hub.endpoint``) or standalone with
``python tests/hub_server.py --port 8765``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

FORBIDDEN_NAMESPACE = "forbidden"
DEFAULT_USER = "user"


@dataclass
class Repo:
    """One stored model repository: its files and the current commit sha."""

    repo_id: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    sha: str = "0" * 40
    commits: int = 0
    messages: list[str] = field(default_factory=list)  # commit messages, oldest first

    def commit(self, additions: dict[str, bytes], deletions: list[str], message: str) -> str:
        for path in deletions:
            self.files.pop(path, None)
            prefix = path.rstrip("/") + "/"
            for name in [p for p in self.files if p.startswith(prefix)]:
                del self.files[name]
        self.files.update(additions)
        self.commits += 1
        self.messages.append(message)
        self.sha = hashlib.sha1(f"{self.repo_id}:{self.commits}:{message}".encode()).hexdigest()
        return self.sha


class HubState:
    """Thread-safe store of repositories plus a request log (method, path) for assertions."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail_commits = 0  # answer the next N commit requests with 500 (to test failed uploads)
        self.hold_commits: threading.Event | None = None  # commits wait until it is set (uploads in flight)


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES = [
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("POST", re.compile(rf"^/api/(?:models|datasets)/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/(?:models|datasets)/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("GET", re.compile(rf"^/api/(?:models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("GET", re.compile(rf"^/api/(?:models|datasets)/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "model_info"),
    ("GET", re.compile(rf"^/(?:datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("HEAD", re.compile(rf"^/(?:datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


def _make_handler(state: HubState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
            pass

        # -------------------------------------------------------------------------------- plumbing
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(
            self,
            status: int,
            payload: object = None,
            *,
            raw: bytes | None = None,
            headers: dict | None = None,
        ) -> None:
            data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header(
                "Content-Type", "application/json" if raw is None else "application/octet-stream"
            )
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code is not None:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers=headers)

        def _token_error(self) -> bool:
            """Answer 401 and return True when the request carries no acceptable token."""
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[len("Bearer ") :].strip():
                self._error(401, "Invalid username or password.")
                return True
            if auth[len("Bearer ") :].startswith("invalid"):
                self._error(401, "Invalid credentials in Authorization header")
                return True
            return False

        def _repo(self, repo_id: str) -> Repo | None:
            repo = state.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        def _check_revision(self, rev: str | None, repo: Repo) -> bool:
            if rev in (None, "main", repo.sha):
                return True
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return False

        def _dispatch(self) -> None:
            path = unquote(urlsplit(self.path).path)
            with state.lock:
                state.requests.append((self.command, path))
            for method, pattern, name in _ROUTES:
                match = pattern.match(path)
                if method == self.command and match:
                    body = self._body() if self.command == "POST" else b""
                    if name == "commit" and state.hold_commits is not None:
                        state.hold_commits.wait(120)
                    with state.lock:
                        getattr(self, f"_route_{name}")(body=body, **match.groupdict())
                    return
            self._error(404, f"no route for {self.command} {path}")

        do_GET = do_HEAD = do_POST = _dispatch

        # -------------------------------------------------------------------------------- routes
        def _base(self) -> str:
            host, port = self.server.server_address[:2]
            return f"http://{host}:{port}"

        def _route_create_repo(self, body: bytes) -> None:
            if self._token_error():
                return
            payload = json.loads(body or b"{}")
            namespace = payload.get("organization") or DEFAULT_USER
            repo_id = f"{namespace}/{payload['name']}"
            if namespace == FORBIDDEN_NAMESPACE:
                self._error(
                    403, f"You don't have the rights to create a model under the namespace {namespace!r}"
                )
                return
            url = f"{self._base()}/{repo_id}"
            if repo_id in state.repos:
                self._send(409, {"error": "You already created this model repo", "url": url})
                return
            state.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            self._send(200, {"url": url, "name": repo_id})

        def _route_validate_yaml(self, body: bytes) -> None:
            self._send(200, {"errors": [], "warnings": []})

        def _route_preupload(self, body: bytes, repo: str, rev: str) -> None:
            if self._token_error() or (stored := self._repo(repo)) is None:
                return
            if not self._check_revision(rev, stored):
                return
            files = json.loads(body or b"{}").get("files", [])
            answer = [
                {"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                for item in files
            ]
            self._send(200, {"files": answer, "commitOid": stored.sha})

        def _route_commit(self, body: bytes, repo: str, rev: str) -> None:
            if self._token_error() or (stored := self._repo(repo)) is None:
                return
            if not self._check_revision(rev, stored):
                return
            if state.fail_commits > 0:
                state.fail_commits -= 1
                self._error(500, "Internal Error (injected by the test)")
                return
            additions: dict[str, bytes] = {}
            deletions: list[str] = []
            message = ""
            for line in body.splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "header":
                    message = value.get("summary", "")
                elif key == "file":
                    additions[value["path"]] = base64.b64decode(value["content"])
                elif key in ("deletedFile", "deletedFolder"):
                    deletions.append(value["path"])
                else:
                    self._error(
                        400, f"unsupported commit operation {key!r} (this test server stores files inline)"
                    )
                    return
            sha = stored.commit(additions, deletions, message)
            self._send(
                200, {"commitOid": sha, "commitUrl": f"{self._base()}/{repo}/commit/{sha}", "success": True}
            )

        def _route_model_info(self, body: bytes, repo: str, rev: str | None = None) -> None:
            if (stored := self._repo(repo)) is None or not self._check_revision(rev, stored):
                return
            self._send(
                200,
                {
                    "id": repo,
                    "modelId": repo,
                    "sha": stored.sha,
                    "private": stored.private,
                    "tags": [],
                    "siblings": [{"rfilename": name} for name in sorted(stored.files)],
                },
            )

        def _route_tree(self, body: bytes, repo: str, rev: str, path: str | None = None) -> None:
            if (stored := self._repo(repo)) is None or not self._check_revision(rev, stored):
                return
            prefix = (path or "").strip("/")
            recursive = "recursive=true" in (urlsplit(self.path).query or "").lower()
            entries, folders = [], set()
            for name in sorted(stored.files):
                if prefix and not name.startswith(prefix + "/"):
                    continue
                rest = name[len(prefix) + 1 :] if prefix else name
                if "/" in rest and not recursive:
                    folders.add((f"{prefix}/" if prefix else "") + rest.split("/")[0])
                    continue
                for depth in range(1, rest.count("/") + 1):
                    folders.add((f"{prefix}/" if prefix else "") + "/".join(rest.split("/")[:depth]))
                data = stored.files[name]
                entries.append(
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                )
            entries += [{"type": "directory", "path": folder, "oid": "0" * 40} for folder in sorted(folders)]
            self._send(200, entries)

        def _route_resolve(self, body: bytes, repo: str, rev: str, path: str) -> None:
            if (stored := self._repo(repo)) is None or not self._check_revision(rev, stored):
                return
            data = stored.files.get(path)
            if data is None:
                self._error(404, f"Entry not found: {path}", "EntryNotFound")
                return
            etag = f'"{hashlib.sha1(data).hexdigest()}"'
            self._send(200, raw=data, headers={"X-Repo-Commit": stored.sha, "ETag": etag})

    return Handler


class HubServer:
    """Run the test Hub on 127.0.0.1 in a background thread (``port=0`` picks a free port)."""

    def __init__(self, port: int = 0) -> None:
        self.state = HubState()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self.state))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    parser = argparse.ArgumentParser(description="Run the test Hub server in the foreground.")
    parser.add_argument("--port", type=int, default=8765)
    port = parser.parse_args().port
    server = HubServer(port)
    print(f"test Hub on {server.endpoint} (Ctrl-C to stop)")
    try:
        server._server.serve_forever()
    except KeyboardInterrupt:
        server.stop()
