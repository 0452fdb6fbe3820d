"""A stand-in for the Hugging Face Hub API on 127.0.0.1: just what ``huggingface_hub``'s ``create_repo`` and
``create_commit`` / ``upload_folder`` call, so uploads are tested without the network.

Endpoints (model repos, one branch ``main``):

- ``POST /api/repos/create`` (409 when the repo exists), ``GET /api/models/<repo>[/revision/<rev>]``
- ``POST /api/validate-yaml``: the README's front matter must be a YAML mapping (400 with ``errors`` otherwise)
- ``POST /api/models/<repo>/preupload/<rev>``: ``lfs`` for binary samples, ``*.gguf`` / ``*.safetensors`` and
  files over 10 MiB, ``regular`` otherwise; ``oid`` of the file already there (git blob sha1, or sha256 for LFS)
- ``POST /<repo>.git/info/lfs/objects/batch`` (basic transfer: an upload ticket URL, or no action when the object
  is stored), ``PUT /_lfs/<ticket>`` (the body must match the oid's sha256 and size), ``POST .../objects/verify``
- ``POST /api/models/<repo>/commit/<rev>``: NDJSON (header, base64 ``file``, ``lfsFile`` by oid)

Every request but the ticket PUT (a pre-signed URL on the Hub) needs ``Authorization: Bearer <token>`` with a
token the server was given (401 otherwise). Files land in ``root/<repo>/``; :attr:`HubServer.commits` records
each commit (repo, oid, message, description, files, lfs). Not spoken: Xet storage (run clients with
``HF_HUB_DISABLE_XET``), deletions, copies, branches other than ``main``, pull requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from pathlib import Path

import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt")
LFS_MIN_BYTES = 10 * 1024 * 1024
BRANCH = "main"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers={"X-Error-Code": code} if code else None)


class HubServer:
    """The stand-in on a free loopback port (``with`` starts and stops it); ``tokens`` maps a token to a user."""

    def __init__(self, root: Path, tokens: dict[str, str]) -> None:
        self.root, self.tokens = Path(root), dict(tokens)
        self.repos: dict[str, dict] = {}  # repo id -> {private, owner, head, files: {path: (sha256, lfs)}}
        self.commits: list[dict] = []
        self.lfs_puts: list[str] = []  # oids received by PUT
        self._tickets: dict[str, tuple[str, int]] = {}
        self.url = ""

    # ------------------------------------------------------------------ state
    def files(self, repo_id: str) -> dict[str, Path]:
        """Path in repo -> the stored file."""
        return {p: self.root / repo_id / p for p in sorted(self.repos[repo_id]["files"])}

    def _lfs(self, oid: str) -> Path:
        return self.root / ".lfs" / oid

    def _user(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return self.tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None

    def _repo_or_error(self, request: Request, repo_id: str) -> dict | JSONResponse:
        if self._user(request) is None:
            return _error(401, "Invalid credentials in Authorization header")
        if repo_id not in self.repos:
            return _error(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    def _info(self, repo_id: str) -> dict:
        repo = self.repos[repo_id]
        return {"id": repo_id, "author": repo_id.split("/")[0], "sha": repo["head"], "private": repo["private"],
                "siblings": [{"rfilename": p} for p in sorted(repo["files"])]}

    # ------------------------------------------------------------------ app
    def app(self) -> FastAPI:
        app = FastAPI(title="cogumi test Hub stand-in")

        @app.post("/api/repos/create")
        async def create(request: Request):
            user = self._user(request)
            if user is None:
                return _error(401, "Invalid credentials in Authorization header")
            body = await request.json()
            if body.get("type", "model") != "model":
                return _error(400, "this stand-in hosts model repos only")
            repo_id = f"{body.get('organization') or user}/{body['name']}"
            url = f"{self.url}/{repo_id}"
            if repo_id in self.repos:
                return JSONResponse({"error": "You already created this model repo", "url": url}, 409)
            head = hashlib.sha1(f"init {repo_id}".encode()).hexdigest()
            self.repos[repo_id] = {"private": body.get("visibility") == "private" or bool(body.get("private")),
                                   "owner": user, "head": head, "files": {}}
            return {"url": url, "name": repo_id, "id": repo_id}

        @app.get("/api/models/{ns}/{name}")
        @app.get("/api/models/{ns}/{name}/revision/{rev}")
        async def info(request: Request, ns: str, name: str, rev: str = BRANCH):
            repo = self._repo_or_error(request, f"{ns}/{name}")
            if isinstance(repo, JSONResponse):
                return repo
            if rev not in (BRANCH, repo["head"]):
                return _error(404, f"Revision not found: {rev}", "RevisionNotFound")
            return self._info(f"{ns}/{name}")

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request):
            if self._user(request) is None:
                return _error(401, "Invalid credentials in Authorization header")
            content = (await request.json()).get("content", "")
            parts = content.split("---\n")
            if not content.startswith("---\n") or len(parts) < 3:
                return JSONResponse({"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
            try:
                meta = yaml.safe_load(parts[1])
            except yaml.YAMLError as exc:
                return JSONResponse({"errors": [{"message": f"invalid YAML: {exc}"}]}, 400)
            if not isinstance(meta, dict):
                return JSONResponse({"errors": [{"message": "metadata must be a YAML mapping"}]}, 400)
            return {"errors": [], "warnings": []}

        @app.post("/api/models/{ns}/{name}/preupload/{rev}")
        async def preupload(request: Request, ns: str, name: str, rev: str):
            repo = self._repo_or_error(request, f"{ns}/{name}")
            if isinstance(repo, JSONResponse):
                return repo
            if rev != BRANCH:
                return _error(404, f"Revision not found: {rev}", "RevisionNotFound")
            out = []
            for f in (await request.json())["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > LFS_MIN_BYTES or b"\0" in sample
                have = repo["files"].get(f["path"])
                oid = None
                if have is not None:
                    oid = have[0] if have[1] else git_blob_sha1((self.root / ns / name / f["path"]).read_bytes())
                out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
            return {"files": out}

        @app.post("/{ns}/{name}.git/info/lfs/objects/batch")
        async def lfs_batch(request: Request, ns: str, name: str):
            repo = self._repo_or_error(request, f"{ns}/{name}")
            if isinstance(repo, JSONResponse):
                return repo
            body = await request.json()
            objects = []
            for obj in body["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not self._lfs(obj["oid"]).is_file():
                    ticket = secrets.token_urlsafe(16)
                    self._tickets[ticket] = (obj["oid"], obj["size"])
                    entry["actions"] = {"upload": {"href": f"{self.url}/_lfs/{ticket}"},
                                        "verify": {"href": f"{self.url}/{ns}/{name}.git/info/lfs/objects/verify"}}
                objects.append(entry)
            return {"transfer": "basic", "objects": objects}

        @app.put("/_lfs/{ticket}")
        async def lfs_put(request: Request, ticket: str):
            if ticket not in self._tickets:
                return _error(403, "unknown or used upload ticket")
            oid, size = self._tickets[ticket]
            data = await request.body()
            if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
                return _error(400, f"object {oid}: the body's size or sha256 differs")
            del self._tickets[ticket]
            self._lfs(oid).parent.mkdir(parents=True, exist_ok=True)
            self._lfs(oid).write_bytes(data)
            self.lfs_puts.append(oid)
            return JSONResponse({})

        @app.post("/{ns}/{name}.git/info/lfs/objects/verify")
        async def lfs_verify(request: Request, ns: str, name: str):
            repo = self._repo_or_error(request, f"{ns}/{name}")
            if isinstance(repo, JSONResponse):
                return repo
            body = await request.json()
            path = self._lfs(body["oid"])
            if not path.is_file() or path.stat().st_size != body["size"]:
                return _error(404, f"object {body['oid']} not stored")
            return JSONResponse({})

        @app.post("/api/models/{ns}/{name}/commit/{rev}")
        async def commit(request: Request, ns: str, name: str, rev: str):
            repo_id = f"{ns}/{name}"
            repo = self._repo_or_error(request, repo_id)
            if isinstance(repo, JSONResponse):
                return repo
            if rev != BRANCH:
                return _error(404, f"Revision not found: {rev}", "RevisionNotFound")
            lines = [json.loads(line) for line in (await request.body()).decode().splitlines() if line.strip()]
            if not lines or lines[0].get("key") != "header":
                return _error(400, "the commit's first NDJSON line must be its header")
            header, staged, lfs_paths = lines[0]["value"], {}, []
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file" and value.get("encoding") == "base64":
                    staged[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    if not self._lfs(value["oid"]).is_file():
                        return _error(422, f"{value['path']}: LFS object {value['oid']} was never uploaded")
                    staged[value["path"]] = self._lfs(value["oid"]).read_bytes()
                    lfs_paths.append(value["path"])
                else:
                    return _error(400, f"operation {line['key']!r} is not supported by this stand-in")
            for path, data in staged.items():
                dest = self.root / repo_id / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                repo["files"][path] = (hashlib.sha256(data).hexdigest(), path in lfs_paths)
            state = json.dumps([repo["head"], header.get("summary"), sorted(repo["files"].items())]).encode()
            repo["head"] = hashlib.sha1(state).hexdigest()
            self.commits.append({"repo_id": repo_id, "oid": repo["head"], "message": header.get("summary"),
                                 "description": header.get("description", ""), "files": sorted(staged),
                                 "lfs": sorted(lfs_paths)})
            return {"success": True, "commitOid": repo["head"], "commitUrl": f"{self.url}/{repo_id}/commit/"
                                                                                f"{repo['head']}"}

        return app

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> HubServer:
        from cogumi_tasks.serve.threaded import ThreadedServer

        self.root.mkdir(parents=True, exist_ok=True)
        self._server = ThreadedServer(self.app(), timeout_s=30, stop_timeout_s=10).start()
        self.url = self._server.url
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop()
