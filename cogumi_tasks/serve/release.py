"""A release: everything serving needs, in one directory (S3: ``<config name>/releases/<id>/``).

Layout::

    base.gguf                  the base model
    recovery.gguf              optional: Phase 2's recovery LoRA, always applied at scale 1
    modifiers/<name>.gguf      the modifiers' GGUF LoRAs
    router/                    a routing.router.Router bundle
    escalation/                a routing.escalation.EscalationDetector bundle
    calibrator.json            compress.calibration.Calibrator fields: method, t, a, b
    release.json               written last: id, created, models, threshold, costs, files {relpath: sha256},
                               lineage, figures

``models`` maps each served model (``base`` and every modifier) to ``{"adapter": relpath or null, "scale",
"domain"}``. A directory without ``release.json`` is unfinished; :func:`load_release` checks every listed file's
sha256 and refuses a mismatch, a missing file or an unlisted one, naming it. The registry's ``current`` pointer is
``releases/current.json`` (``{"id": ...}``), resolved by :func:`resolve_release`.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cogumi_tasks.core.artifacts import sha256_file

if TYPE_CHECKING:
    from cogumi_tasks.compress.calibration import Calibrator
    from cogumi_tasks.core.artifacts import ArtifactStore

FORMAT = "cogumi-release/1"
MANIFEST = "release.json"
BASE, RECOVERY, CALIBRATOR = "base.gguf", "recovery.gguf", "calibrator.json"
ROUTER_DIR, ESCALATION_DIR, MODIFIERS_DIR = "router", "escalation", "modifiers"
CURRENT = "current.json"


class ReleaseError(ValueError):
    """A release directory that is incomplete, altered, or not a release."""


@dataclass(frozen=True)
class Release:
    """A verified release directory and its manifest."""

    root: Path
    manifest: dict = field(repr=False)

    @property
    def id(self) -> str:
        return self.manifest["id"]

    @property
    def base(self) -> Path:
        return self.root / BASE

    @property
    def recovery(self) -> Path | None:
        return self.root / RECOVERY if (self.root / RECOVERY).is_file() else None

    @property
    def models(self) -> list[str]:
        """``base`` first, then the modifiers in manifest order."""
        names = list(self.manifest["models"])
        return ["base", *(n for n in names if n != "base")]

    @property
    def modifiers(self) -> dict[str, Path]:
        """Modifier name -> its GGUF LoRA."""
        return {n: self.root / m["adapter"] for n, m in self.manifest["models"].items() if m.get("adapter")}

    @property
    def threshold(self) -> float | None:
        return self.manifest.get("threshold")

    @property
    def costs(self) -> dict[str, float]:
        return dict(self.manifest.get("costs") or {})

    @property
    def router_dir(self) -> Path:
        return self.root / ROUTER_DIR

    @property
    def escalation_dir(self) -> Path:
        return self.root / ESCALATION_DIR

    @property
    def model_files(self) -> dict[str, str]:
        """sha256 of the files the engine loads (base, recovery, modifiers) and each model's adapter and scale: two
        releases with equal ``model_files`` can swap without restarting the engine."""
        files = self.manifest["files"]
        out = {rel: sha for rel, sha in files.items() if rel in (BASE, RECOVERY) or rel.startswith(MODIFIERS_DIR + "/")}
        return out | {f"model:{n}": f"{m.get('adapter')}@{m.get('scale')}" for n, m in self.manifest["models"].items()}

    def calibrator(self) -> Calibrator:
        from cogumi_tasks.compress.calibration import Calibrator

        fields = json.loads((self.root / CALIBRATOR).read_text())
        return Calibrator(**{k: fields[k] for k in ("method", "t", "a", "b") if k in fields})


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
    elif src.is_file():
        shutil.copyfile(src, dest)
    else:
        raise ReleaseError(f"{src}: no such file or directory")


def build_release(out_dir: Path, *, base: Path, modifiers: Mapping[str, Path], router: Path, escalation: Path,
                  calibrator: Mapping[str, Any], recovery: Path | None = None, threshold: float | None = None,
                  costs: Mapping[str, float] | None = None, domains: Mapping[str, str] | None = None,
                  lineage: list | dict | None = None, figures: dict | None = None, release_id: str | None = None,
                  scales: Mapping[str, float] | None = None) -> dict:
    """Copy the parts into ``out_dir`` (the layout above) and write ``release.json`` last; returns the manifest.

    ``threshold`` and ``costs`` default to the router bundle's; ``domains`` maps a modifier to its domain (default:
    its name); ``scales`` a modifier's LoRA scale when chosen (default 1)."""
    from cogumi_tasks.routing.router import MANIFEST as ROUTER_MANIFEST

    out_dir = Path(out_dir)
    if (out_dir / MANIFEST).exists():
        raise ReleaseError(f"{out_dir / MANIFEST}: exists already; a release is never rewritten")
    for name in modifiers:
        if name == "base" or not name.replace("_", "").replace("-", "").isalnum():
            raise ReleaseError(f"modifier name {name!r}: letters, digits, _ and -, and not 'base'")
    cal_fields = {k: float(v) for k, v in calibrator.items() if k in ("t", "a", "b")}
    if calibrator.get("method") not in ("temperature", "platt"):
        raise ReleaseError(f"calibrator: field 'method': {calibrator.get('method')!r}, expected temperature or platt")
    router_manifest = json.loads((Path(router) / ROUTER_MANIFEST).read_text())
    unknown = sorted(set(router_manifest["models"]) - {"base", *modifiers})
    if unknown:
        raise ReleaseError(f"router {router}: routes to {unknown}, which the release has no adapter for")
    _copy(Path(base), out_dir / BASE)
    if recovery is not None:
        _copy(Path(recovery), out_dir / RECOVERY)
    models: dict[str, dict] = {"base": {"adapter": None, "scale": 0.0, "domain": None}}
    for name, path in modifiers.items():
        rel = f"{MODIFIERS_DIR}/{name}.gguf"
        _copy(Path(path), out_dir / rel)
        models[name] = {"adapter": rel, "scale": float((scales or {}).get(name, 1.0)),
                        "domain": (domains or {}).get(name, name)}
    _copy(Path(router), out_dir / ROUTER_DIR)
    _copy(Path(escalation), out_dir / ESCALATION_DIR)
    (out_dir / CALIBRATOR).write_text(json.dumps({"method": calibrator["method"], **cal_fields}, indent=1))
    files = {p.relative_to(out_dir).as_posix(): sha256_file(p) for p in sorted(out_dir.rglob("*")) if p.is_file()}
    manifest = {"format": FORMAT, "id": release_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-")
                + uuid.uuid4().hex[:6], "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "models": models, "threshold": router_manifest.get("threshold") if threshold is None else threshold,
                "costs": dict(costs if costs is not None else router_manifest.get("costs") or {}),
                "files": files, "lineage": lineage or [], "figures": figures or {}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_release(root: Path) -> Release:
    """The release in ``root``, every file checked against ``release.json``'s sha256."""
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise ReleaseError(f"{path}: missing (not a release, or an unfinished one)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReleaseError(f"{path}: invalid JSON: {exc.msg} at line {exc.lineno}") from None
    if manifest.get("format") != FORMAT:
        raise ReleaseError(f"{path}: field 'format': {manifest.get('format')!r}, expected {FORMAT!r}")
    for key in ("id", "models", "files"):
        if key not in manifest:
            raise ReleaseError(f"{path}: field {key!r}: missing")
    listed = manifest["files"]
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(set(listed) | present):
        if rel not in listed:
            raise ReleaseError(f"{root / rel}: not listed in {MANIFEST}")
        if rel not in present:
            raise ReleaseError(f"{root / rel}: listed in {MANIFEST} but missing")
        if sha256_file(root / rel) != listed[rel]:
            raise ReleaseError(f"{root / rel}: sha256 differs from {MANIFEST} (altered or corrupt)")
    for rel in (BASE, CALIBRATOR, f"{ROUTER_DIR}/manifest.json", f"{ESCALATION_DIR}/vocab.json"):
        if rel not in listed:
            raise ReleaseError(f"{root}: {rel} missing from the release")
    for name, m in manifest["models"].items():
        if m.get("adapter") and m["adapter"] not in listed:
            raise ReleaseError(f"{path}: field 'models.{name}.adapter': {m['adapter']!r} is not a file of the release")
    return Release(root, manifest)


def resolve_release(spec: str, dest: Path, store: ArtifactStore | None = None, prefix: str | None = None) -> Release:
    """A release from a local directory, an ``s3://`` prefix, or ``current`` (the id named by
    ``<prefix>/current.json``, where ``prefix`` is the registry's ``s3://<bucket>/<config name>/releases``)."""
    from cogumi_tasks.core.artifacts import join_uri

    if not spec.startswith("s3://") and spec != "current":
        return load_release(Path(spec))
    if store is None:
        raise ReleaseError(f"release {spec!r}: needs an artifact store (a config with storage)")
    if spec == "current":
        if prefix is None:
            raise ReleaseError("release 'current': needs the registry prefix")
        pointer = store.get_json(join_uri(prefix, CURRENT))
        if not isinstance(pointer, dict) or not pointer.get("id"):
            raise ReleaseError(f"{join_uri(prefix, CURRENT)}: field 'id': missing")
        spec = join_uri(prefix, str(pointer["id"]))
    return load_release(store.fetch_prefix(spec, dest))


def publish_release(store: ArtifactStore, root: Path, registry: str, *, expect_current: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict:
    """Copy the release in ``root`` to ``<registry>/<id>/`` (``release.json`` last; skipped when the registry has
    it already: a release is never rewritten) and point ``<registry>/current.json`` at it, written last. With
    ``expect_current``, the pointer is moved only while it still names that release (ReleaseError otherwise).
    Returns the pointer (``{"id", "uri", "previous", "promoted_at", **extra}``; the existing one when it names
    this release already)."""
    import time

    from cogumi_tasks.core.artifacts import join_uri

    release = load_release(root)
    target, pointer_uri = join_uri(registry, release.id), join_uri(registry, CURRENT)
    if not store.exists(join_uri(target, MANIFEST)):
        for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.name != MANIFEST):
            store.upload(path, join_uri(target, path.relative_to(root).as_posix()))
        store.upload(Path(root) / MANIFEST, join_uri(target, MANIFEST))  # complete once this exists
    previous = store.get_json(pointer_uri) if store.exists(pointer_uri) else None
    was = (previous or {}).get("id")
    if was == release.id:
        return previous
    if expect_current is not None and was != expect_current:
        raise ReleaseError(f"{pointer_uri}: names {was}, not {expect_current}: another release was made current "
                           "meanwhile; not moved")
    pointer = {"id": release.id, "uri": target, "previous": was, "promoted_at": time.time(), **(extra or {})}
    store.put_json(pointer_uri, pointer)
    return pointer
