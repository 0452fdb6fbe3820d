"""Upload a release to the Hugging Face Hub (optional: ``serve.hub.repo_id``; ``serve.promote`` calls it).

One commit per release, made with ``huggingface_hub``'s :class:`~huggingface_hub.HfApi`: the repo is created if
missing (``exist_ok``; an existing repo keeps its visibility), then every file ``release.json`` lists plus
``release.json`` itself goes up under its own path, and ``MODEL_CARD.md`` once more as ``README.md`` so the Hub
shows the card (its YAML front matter is the Hub's metadata). The release is verified first
(:func:`~cogumi_tasks.serve.release.load_release`), so only files matching their sha256 leave. Files the Hub
already holds unchanged are skipped by ``huggingface_hub``, so pushing the same release again makes no commit.

The token comes from the environment only (:data:`TOKEN_ENV`), never from the config, and is never logged. Large
files go through the Hub's large-file storage (Xet when ``hf_xet`` is installed, else Git LFS). The endpoint is the
config's ``serve.hub.endpoint``, else ``huggingface_hub``'s own default (env ``HF_ENDPOINT``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("cogumi")

TOKEN_ENV = "HF_TOKEN"
README, CARD = "README.md", "MODEL_CARD.md"


class HubError(RuntimeError):
    """An upload to the Hub that could not be made; the message names the repo and, when one came, the HTTP status."""


def hub_token() -> str:
    """The Hub token from the environment (:data:`TOKEN_ENV`); :class:`HubError` naming the variable when unset."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise HubError(f"serve.hub.repo_id is set but the environment variable {TOKEN_ENV} is empty: export a Hugging "
                       "Face token with write access to the repo (it is read from the environment only)")
    return token


def release_files(root: Path, manifest: dict) -> dict[str, Path]:
    """Path in the repo -> local file: every file of the release, ``release.json``, and the card as README.md."""
    from cogumi_tasks.serve.release import MANIFEST

    files = {rel: root / rel for rel in sorted(manifest["files"])}
    files[MANIFEST] = root / MANIFEST
    if CARD in files:
        files[README] = files[CARD]
    return files


def _failure(exc: Exception, rid: str, where: str) -> HubError:
    """A clear :class:`HubError` from what ``huggingface_hub`` or the transport raised."""
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(f"release {rid}: upload to {where} not tried: HF_HUB_OFFLINE is set in this process (unset "
                        "it for the worker that runs serve.promote)")
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        hint = {401: f" (is {TOKEN_ENV} a valid token?)", 403: f" ({TOKEN_ENV} may not write to this namespace)",
                404: " (no such repo or revision, or the token cannot see it)"}.get(status, "")
        detail = getattr(exc, "server_message", None) or str(exc).splitlines()[0]
        return HubError(f"release {rid}: upload to {where} failed: HTTP {status}{hint}: {detail}")
    if isinstance(exc, httpx.TransportError):
        return HubError(f"release {rid}: upload to {where} failed: could not reach the Hub: {exc!r}")
    return HubError(f"release {rid}: upload to {where} failed: {exc}")


def push_release(release_dir: Path | str, repo_id: str, *, token: str, endpoint: str | None = None,
                 private: bool = True, revision: str = "main") -> dict:
    """Upload the release in ``release_dir`` to the model repo ``repo_id`` in one commit naming the release id.

    Returns ``{"repo_id", "commit", "files", "url", "commit_url"}``: ``commit`` is the revision's head after the
    push (the same as before when the Hub held every file unchanged already), ``files`` the paths in the repo.
    Raises :class:`HubError` naming the repo and the HTTP status when the Hub refuses or cannot be reached, and
    :class:`~cogumi_tasks.serve.release.ReleaseError` when the release directory does not verify."""
    import httpx
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    from cogumi_tasks.serve.release import FORMAT, load_release

    if not token:
        raise HubError(f"push_release to {repo_id}: no token (set {TOKEN_ENV})")
    release = load_release(Path(release_dir))
    files = release_files(release.root, release.manifest)
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{api.endpoint.rstrip('/')}/{repo_id} (revision {revision})"
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files.items()]
    description = (f"{FORMAT} release {release.id}: {len(release.manifest['files'])} files, each with its sha256 in "
                   "release.json; README.md is MODEL_CARD.md.")
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=f"Cogumi release {release.id}",
                                 commit_description=description, revision=revision, repo_type="model")
    except (HfHubHTTPError, OfflineModeIsEnabled, httpx.TransportError) as exc:
        raise _failure(exc, release.id, where) from exc
    except ValueError as exc:  # huggingface_hub's own checks, e.g. README.md metadata the Hub refused
        raise HubError(f"release {release.id}: upload to {where} refused: {exc}") from exc
    size = sum(p.stat().st_size for p in files.values())
    log.info("release %s on the Hub: %s at %s (%d files, %.1f MB)", release.id, repo_id, info.oid[:12], len(files),
             size / 1e6)
    return {"repo_id": repo_id, "commit": info.oid, "files": sorted(files), "url": str(repo_url),
            "commit_url": info.commit_url}
