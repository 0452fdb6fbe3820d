"""Artifacts in S3: one store, sha256-verified files, manifests written last.

Layout: ``s3://<bucket>/<pipeline>/<step>/<cache_key>/<files>`` plus ``_manifest.json``.
A prefix without a manifest is unfinished, whatever files it holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cogumi_tasks.core.config import StorageConfig
from cogumi_tasks.core.secrets import redact

MANIFEST = "_manifest.json"
CHUNK = 8 * 1024 * 1024


class ArtifactError(RuntimeError):
    """A missing, corrupt or unreadable artifact."""


def split_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ArtifactError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def join_uri(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


def parent_uri(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def sha256_dir(path: str | Path) -> str:
    """A directory's digest: the sha256 of its files' relative names and sha256s."""
    root = Path(path)
    return sha256_json({p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()})


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class ArtifactStore:
    """Thin boto3 wrapper: put/get files and JSON, list, and manifests that verify."""

    def __init__(self, storage: StorageConfig, credentials: dict[str, str] | None = None):
        import boto3
        from botocore.config import Config

        creds = credentials or {}
        self.storage = storage
        self.client = boto3.client(
            "s3",
            endpoint_url=storage.endpoint_url or os.environ.get("COGUMI_S3_ENDPOINT") or None,
            region_name=storage.region,
            aws_access_key_id=creds.get("aws_access_key_id"),
            aws_secret_access_key=creds.get("aws_secret_access_key"),
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"}),
        )

    # ------------------------------------------------------------ basics
    def ensure_bucket(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.storage.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.storage.bucket)

    def uri(self, *parts: str) -> str:
        return join_uri(f"s3://{self.storage.bucket}", *parts)

    def exists(self, uri: str) -> bool:
        return self.head(uri) is not None

    def head(self, uri: str) -> dict | None:
        from botocore.exceptions import ClientError

        bucket, key = split_uri(uri)
        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def put_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_uri(uri)
        self.client.put_object(Bucket=bucket, Key=key, Body=data)

    def get_bytes(self, uri: str) -> bytes:
        from botocore.exceptions import ClientError

        bucket, key = split_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            raise ArtifactError(f"cannot read {uri}: {exc}") from exc

    def put_json(self, uri: str, obj: Any) -> None:
        """Write ``obj`` as JSON (manifests, metrics, markers), every secret value masked (core.secrets)."""
        self.put_bytes(uri, redact(json.dumps(obj, indent=1, sort_keys=True)).encode())

    def get_json(self, uri: str) -> Any:
        return json.loads(self.get_bytes(uri))

    def upload(self, path: str | Path, uri: str) -> None:
        bucket, key = split_uri(uri)
        self.client.upload_file(str(path), bucket, key)

    def download(self, uri: str, path: str | Path) -> Path:
        bucket, key = split_uri(uri)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            self.client.download_file(bucket, key, str(tmp))
        except Exception as exc:
            raise ArtifactError(f"cannot download {uri}: {exc}") from exc
        tmp.replace(path)
        return path

    def list(self, prefix_uri: str) -> Iterator[str]:
        bucket, key = split_uri(prefix_uri)
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=key):
            for obj in page.get("Contents", []):
                yield f"s3://{bucket}/{obj['Key']}"

    def delete_prefix(self, prefix_uri: str) -> int:
        bucket, _ = split_uri(prefix_uri)
        keys = [split_uri(u)[1] for u in self.list(prefix_uri)]
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]]}
            )
        return len(keys)

    # ------------------------------------------------------------ manifests
    def read_manifest(self, prefix_uri: str) -> dict | None:
        uri = join_uri(prefix_uri, MANIFEST)
        if not self.exists(uri):
            return None
        return self.get_json(uri)

    def verify_manifest(self, prefix_uri: str) -> dict | None:
        """The manifest if it exists and every file it lists is present with its size, else None."""
        manifest = self.read_manifest(prefix_uri)
        if manifest is None:
            return None
        for name, meta in manifest["files"].items():
            head = self.head(join_uri(prefix_uri, name))
            if head is None or head["ContentLength"] != meta["size"]:
                return None
        return manifest

    def publish(self, prefix_uri: str, local_dir: Path, manifest: dict) -> dict:
        """Upload every file under ``local_dir``, then the manifest listing them (sha256, size)."""
        files: dict[str, dict] = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            files[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
            self.upload(path, join_uri(prefix_uri, rel))
        manifest = {**manifest, "files": files, "published_at": time.time()}
        self.put_json(join_uri(prefix_uri, MANIFEST), manifest)
        return manifest

    def producer_manifest(self, uri: str) -> dict | None:
        """The manifest of the step that produced ``uri`` (it sits in the file's prefix)."""
        prefix = parent_uri(uri)
        while prefix.count("/") > 3:
            manifest = self.read_manifest(prefix)
            if manifest is not None:
                return manifest
            prefix = parent_uri(prefix)
        return None

    def digest(self, uri: str) -> str:
        """A content digest for an input: its sha256 from the producer's manifest, else ETag+size.

        A directory (a URI ending in ``/``, e.g. a model) digests the names and digests of its files.
        """
        manifest = self.producer_manifest(uri)
        if manifest is not None:
            rel = uri[len(manifest["prefix"]) + 1 :].rstrip("/")
            if rel in manifest["files"]:
                return "sha256:" + manifest["files"][rel]["sha256"]
            under = {k[len(rel) + 1 :]: v["sha256"] for k, v in manifest["files"].items() if k.startswith(rel + "/")}
            if under:
                return "sha256-dir:" + sha256_json(under)
        if uri.endswith("/"):
            heads = {u[len(uri):]: (self.head(u) or {}) for u in self.list(uri)}
            if not heads:
                raise ArtifactError(f"input {uri}: no files under it")
            return "etag-dir:" + sha256_json({k: [h.get("ETag"), h.get("ContentLength")] for k, h in heads.items()})
        head = self.head(uri)
        if head is None:
            raise ArtifactError(f"input {uri} does not exist")
        return f"etag:{head['ETag'].strip(chr(34))}:{head['ContentLength']}"

    def fetch_prefix(self, prefix_uri: str, dest_dir: Path) -> Path:
        """Download a directory (a model, say) into ``dest_dir``: the files its producer's manifest lists
        under ``prefix_uri``, each checked against its sha256; without a manifest (files put there by
        hand), every file under the prefix."""
        prefix_uri = prefix_uri.rstrip("/")
        tag = hashlib.sha256(prefix_uri.encode()).hexdigest()[:12]
        root = Path(dest_dir) / tag
        manifest = self.producer_manifest(prefix_uri + "/x")
        if manifest is not None:
            sub = prefix_uri[len(manifest["prefix"]) :].strip("/")
            listed = {(name[len(sub) + 1 :] if sub else name): meta for name, meta in manifest["files"].items()
                      if not sub or name.startswith(sub + "/")}
            if not listed:
                raise ArtifactError(f"{prefix_uri}/: its producer's manifest lists no files under it")
            for rel, meta in listed.items():
                local = self.download(join_uri(prefix_uri, rel), root / rel)
                if sha256_file(local) != meta["sha256"]:
                    raise ArtifactError(f"{prefix_uri}/{rel}: sha256 differs from its manifest")
            return root
        found = False
        for uri in self.list(prefix_uri + "/"):
            rel = uri[len(prefix_uri) + 1 :]
            if rel.startswith("_") or "/_" in rel:
                continue
            found = True
            self.download(uri, root / rel)
        if not found:
            raise ArtifactError(f"nothing under {prefix_uri}/")
        return root

    def fetch(self, uri: str, dest_dir: Path) -> Path:
        """Download ``uri`` into ``dest_dir`` and check its sha256 against the producer's manifest."""
        tag = hashlib.sha256(uri.encode()).hexdigest()[:12]
        path = self.download(uri, Path(dest_dir) / tag / uri.rsplit("/", 1)[1])
        manifest = self.producer_manifest(uri)
        if manifest is not None:
            rel = uri[len(manifest["prefix"]) + 1 :]
            want = manifest["files"].get(rel, {}).get("sha256")
            if want and sha256_file(path) != want:
                raise ArtifactError(f"{uri}: sha256 differs from its manifest (corrupt or overwritten)")
        return path


def lineage(store: ArtifactStore, manifest: dict) -> list[dict]:
    """Every ancestor manifest of ``manifest`` (through its inputs' producers), nearest first."""
    seen: set[str] = {manifest["prefix"]}
    queue, out = [manifest], []
    while queue:
        current = queue.pop(0)
        for value in current.get("inputs", {}).values():
            for uri in [value] if isinstance(value, str) else value:
                if not uri.startswith("s3://"):
                    continue
                parent = store.producer_manifest(uri)
                if parent is not None and parent["prefix"] not in seen:
                    seen.add(parent["prefix"])
                    out.append(parent)
                    queue.append(parent)
    return out
