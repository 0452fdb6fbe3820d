"""The step contract: a registry of named, versioned steps and the runner that caches them.

A step is a plain function ``fn(ctx: StepContext) -> StepOutput``. It reads its inputs through
``ctx`` and writes its output files under ``ctx.out_dir``; the runner publishes them to
``s3://<bucket>/<pipeline>/<step>/<cache_key>/`` and writes ``_manifest.json`` last.

A step declares what it reads and writes: the config keys (``ctx.config`` is a frozen view of only
those, see :mod:`cogumi_tasks.core.view`), its input names and its output names; the runner refuses
anything else. Cache key = sha256(step name, version, a digest of its code, the declared config
values, the content digests of every file they name, the digests of its inputs, its params): see
:func:`key_material`. A prefix whose manifest verifies is reused without running anything.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogumi_tasks.core.artifacts import ArtifactError, ArtifactStore, join_uri, sha256_dir, sha256_file, sha256_json
from cogumi_tasks.core.config import PipelineConfig, config_dir
from cogumi_tasks.core.view import ConfigView, check_reads, file_refs, view_values

log = logging.getLogger("cogumi")

InputValue = str | list[str]
StepFn = Callable[["StepContext"], "StepOutput"]

# Modules that register steps; imported lazily by get_step().
STEP_MODULES = ["cogumi_tasks.data.steps", "cogumi_tasks.eval.steps", "cogumi_tasks.train.steps",
                "cogumi_tasks.train.improve_steps", "cogumi_tasks.compress.steps",
                "cogumi_tasks.compress.recover", "cogumi_tasks.modifiers.publish",
                "cogumi_tasks.modifiers.cascade", "cogumi_tasks.modifiers.lora_steps",
                "cogumi_tasks.routing.escalation", "cogumi_tasks.routing.labels",
                "cogumi_tasks.routing.router_steps", "cogumi_tasks.routing.publish", "cogumi_tasks.serve.deploy",
                "cogumi_tasks.serve.traffic", "cogumi_tasks.serve.recalibrate"]


@dataclass
class StepOutput:
    """What a step returns: output names -> file(s) relative to ``out_dir`` (a directory as ``name/``),
    and metrics."""

    files: dict[str, str | list[str]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepSpec:
    """A registered step and its declarations (see :func:`step`)."""

    name: str
    fn: StepFn
    version: int
    reads: tuple[str, ...]
    doc: str
    config_inputs: tuple[tuple[str, str], ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    optional_outputs: tuple[str, ...] = ()
    code: tuple[str, ...] = ()

    @property
    def all_outputs(self) -> tuple[str, ...]:
        return self.outputs + self.optional_outputs


@dataclass
class StepResult:
    """Output URIs and metrics of a run (or of the cached run it reused)."""

    step: str
    outputs: dict[str, InputValue]
    metrics: dict[str, Any]
    manifest_uri: str
    skipped: bool


REGISTRY: dict[str, StepSpec] = {}


def step(
    name: str,
    *,
    version: int = 1,
    reads: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    code: tuple[str, ...] = (),
    config_inputs: dict[str, str] | None = None,
) -> Callable[[StepFn], StepFn]:
    """Register ``fn`` as step ``name``.

    ``reads``: the dotted config keys it reads, at any depth (``judge``, ``compress.prune.ppl_rows``);
    ``ctx.config`` exposes only these (and ``name``), and their values and the content of every file they
    name are in the cache key. ``inputs``: the input names it accepts. ``outputs``: the output names it
    returns (``"adapter?"``: one it may leave out). ``code``: modules besides its own whose source is in
    the cache key. ``config_inputs``: input name -> dotted config key naming its default (the prompt file),
    hashed by content like any input; these names are declared inputs too.
    """
    check_reads(name, reads)
    extra = tuple(sorted((config_inputs or {}).items()))

    def register(fn: StepFn) -> StepFn:
        REGISTRY[name] = StepSpec(
            name, fn, version, tuple(reads), (fn.__doc__ or "").strip(), extra,
            inputs=tuple(sorted({*inputs, *(k for k, _ in extra)})),
            outputs=tuple(o for o in outputs if not o.endswith("?")),
            optional_outputs=tuple(o[:-1] for o in outputs if o.endswith("?")),
            code=(fn.__module__, *(m for m in code if m != fn.__module__)),
        )
        return fn

    return register


def get_step(name: str) -> StepSpec:
    if name not in REGISTRY:
        for module in STEP_MODULES:
            importlib.import_module(module)
    if name not in REGISTRY:
        raise KeyError(f"no step named {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def all_steps() -> dict[str, StepSpec]:
    for module in STEP_MODULES:
        importlib.import_module(module)
    return dict(REGISTRY)


class StepFailed(RuntimeError):
    """A step could not finish; its message says why (file, line, field, figure)."""


@dataclass
class StepContext:
    """Everything a running step may touch."""

    spec: StepSpec
    config: ConfigView  # only the keys the step declares in ``reads``
    store: ArtifactStore
    inputs: dict[str, InputValue]
    params: dict[str, Any]
    prefix: str
    run_id: str
    out_dir: Path
    tmp_dir: Path
    cost: dict[str, Any] = field(default_factory=dict)

    @property
    def pipeline_uri(self) -> str:
        return self.store.uri(self.config.name)

    def work_uri(self, *parts: str) -> str:
        """Checkpoint space inside this step's prefix: survives a kill, reused by the retry."""
        return join_uri(self.prefix, "_work", *parts)

    def fetch(self, uri: str) -> Path:
        """A local copy of an input: downloaded and sha256-verified, or a builtin/local file."""
        local = resolve_local(uri)
        return local if local is not None else self.store.fetch(uri, self.tmp_dir / "inputs")

    def fetch_dir(self, uri: str) -> Path:
        """A local copy of a directory input (an s3:// prefix, verified) or a local directory."""
        if uri.startswith("s3://"):
            return self.store.fetch_prefix(uri, self.tmp_dir / "inputs")
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise StepFailed(f"input {uri}: not a directory")
        return path

    def input_list(self, name: str) -> list[str]:
        value = self.inputs.get(name)
        if value is None:
            raise StepFailed(f"{self.spec.name}: missing input {name!r} (have {sorted(self.inputs)})")
        return [value] if isinstance(value, str) else list(value)

    def input(self, name: str) -> str:
        values = self.input_list(name)
        if len(values) != 1:
            raise StepFailed(f"{self.spec.name}: input {name!r} must be one URI, got {len(values)}")
        return values[0]

    def out(self, name: str) -> Path:
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def ledger_prefix(self) -> str:
        return join_uri(self.pipeline_uri, "_runs", safe_name(self.run_id), "ledger")

    @property
    def llm_cache_prefix(self) -> str:
        return join_uri(self.pipeline_uri, "_llm_cache")


def safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def resolve_local(uri: str) -> Path | None:
    """The file behind a ``builtin:<name>`` resource or a local path; None for s3:// URIs."""
    if uri.startswith("s3://"):
        return None
    if uri.startswith("builtin:"):
        from importlib.resources import files

        path = Path(str(files("cogumi_tasks") / "resources" / f"{uri[8:]}.jsonl"))
    else:
        path = Path(uri.removeprefix("file://"))
        if not path.is_absolute() and not path.exists() and (config_dir() / path).exists():
            path = config_dir() / path  # a file named in a config (a recipe) is relative to the configs folder
    if not path.exists():
        raise StepFailed(f"input {uri}: no such file ({path})")
    return path


def input_digests(store: ArtifactStore, inputs: dict[str, InputValue]) -> dict[str, list[str]]:
    """Content digests of every input: from producers' manifests, S3 ETags, or local file hashes."""
    out = {}
    for name in sorted(inputs):
        values = inputs[name]
        values = [values] if isinstance(values, str) else list(values)
        digests = []
        for v in values:
            local = resolve_local(v)
            if local is None:
                digests.append(store.digest(v))
            elif local.is_dir():
                digests.append("sha256-dir:" + sha256_dir(local))
            else:
                digests.append("sha256:" + sha256_file(local))
        out[name] = digests
    return out


_DIGESTS: dict[tuple, str] = {}
MEMO_BYTES = 16 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a local file. A big one (a model) is remembered per (path, inode, size, mtime, ctime) so it is
    read once per process; a small one is read every time (a same-size rewrite within the clock's tick stays seen)."""
    st = path.stat()
    if st.st_size < MEMO_BYTES:
        return sha256_file(path)
    memo = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = sha256_file(path)
    return _DIGESTS[memo]


def module_digest(module: str) -> str:
    """sha256 of a module's source file."""
    found = importlib.util.find_spec(module)
    if found is None or not found.origin or not Path(found.origin).is_file():
        raise ValueError(f"code module {module!r}: no source file to digest")
    return file_sha256(Path(found.origin))


def code_digest(spec: StepSpec) -> str:
    """A digest of the step's own module and its declared ``code`` modules: a code change re-runs the step."""
    return sha256_json({m: module_digest(m) for m in spec.code})


def config_file_digest(value: str, store: ArtifactStore | None) -> str:
    """The content digest of a file a config names: an ``s3://`` object's from its producer's manifest (else
    its ETag), a local file's or directory's sha256 (relative paths are in the configs folder), a bundled
    ``builtin:`` resource's sha256, an installed ``package:``'s version. Anything else (a packaged model
    pinned in requirements.lock, a hub name, a file that is not there) is keyed by its name."""
    if value.startswith("s3://"):
        if store is None:
            raise ValueError(f"{value}: digesting an s3:// file named in config needs an artifact store")
        try:
            return store.digest(value)
        except ArtifactError:  # not there (yet): a step that needs it fails saying so; one that does not, runs
            return "missing:" + value
    if value.startswith("package:"):
        from importlib.metadata import PackageNotFoundError, packages_distributions, version

        dists = packages_distributions().get(value[8:], [])
        try:
            return f"{value}@{version(dists[0])}" if dists else f"{value}@unknown"
        except PackageNotFoundError:
            return f"{value}@unknown"
    if value.startswith("builtin:"):
        from importlib.resources import files

        path = Path(str(files("cogumi_tasks") / "resources" / f"{value[8:]}.jsonl"))
    else:
        path = Path(value.removeprefix("file://"))
        if not path.is_absolute() and not path.exists():
            path = config_dir() / path
    if path.is_dir():
        return "sha256-dir:" + sha256_json({p.relative_to(path).as_posix(): file_sha256(p)
                                            for p in sorted(path.rglob("*")) if p.is_file()})
    return "sha256:" + file_sha256(path) if path.is_file() else "name:" + value


def config_file_digests(spec: StepSpec, config: PipelineConfig, store: ArtifactStore | None) -> dict[str, str]:
    """Dotted key -> content digest of every file named under the step's declared config keys."""
    return {key: config_file_digest(value, store) for key, value in file_refs(config, spec.reads).items()}


def key_material(spec: StepSpec, config: PipelineConfig, digests: dict, params: dict,
                 file_digests: dict[str, str]) -> dict:
    """Everything the cache key covers, as plain data (also written into the manifest)."""
    return {
        "step": spec.name,
        "version": spec.version,
        "code": code_digest(spec),
        "config": view_values(config, spec.reads),
        "config_files": file_digests,
        "inputs": digests,
        "params": params,
    }


def cache_key(spec: StepSpec, config: PipelineConfig, digests: dict, params: dict, *,
              file_digests: dict[str, str] | None = None, store: ArtifactStore | None = None) -> str:
    """The step's cache key, computed without running it: ``digests`` are its inputs' (see
    :func:`input_digests`); the files its config names are digested here unless ``file_digests`` is given
    (``store`` is needed only for ``s3://`` ones)."""
    if file_digests is None:
        file_digests = config_file_digests(spec, config, store)
    return sha256_json(key_material(spec, config, digests, params, file_digests))


def _dotted_get(config: PipelineConfig, dotted: str) -> Any:
    parent, _, leaf = dotted.rpartition(".")
    return config.section(parent)[leaf] if parent else config.section(leaf)


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("cogumi")
    except PackageNotFoundError:
        v = "unknown"
    return os.environ.get("COGUMI_CODE_VERSION", v)


def run_step(
    name: str,
    config: PipelineConfig,
    inputs: dict[str, InputValue] | None = None,
    *,
    params: dict[str, Any] | None = None,
    run_id: str = "manual",
    store: ArtifactStore | None = None,
    force: bool = False,
) -> StepResult:
    """Run step ``name`` (or reuse its cached result) and return its output URIs and metrics."""
    spec = get_step(name)
    store = store or ArtifactStore(config.storage)
    inputs = dict(inputs or {})
    for input_name, dotted in spec.config_inputs:
        inputs.setdefault(input_name, _dotted_get(config, dotted))
    undeclared = sorted(set(inputs) - set(spec.inputs))
    if undeclared:
        raise StepFailed(f"{name}: input(s) {undeclared} are not declared by the step (it declares "
                         f"{list(spec.inputs)}): check the input names or declare them in @step(inputs=...)")
    params = dict(params or {})
    digests = input_digests(store, inputs)
    material = key_material(spec, config, digests, params, config_file_digests(spec, config, store))
    key = sha256_json(material)
    prefix = store.uri(config.name, spec.name, key[:20])

    manifest = None if force else store.verify_manifest(prefix)
    if manifest is not None:
        log.info("%s: cached result at %s (cache key %s): skipped", name, prefix, key[:20])
        _record_use(store, config, run_id, name, prefix)
        return StepResult(name, manifest["outputs"], manifest["metrics"], join_uri(prefix, "_manifest.json"), True)

    log.info("%s: running, outputs go to %s", name, prefix)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"cogumi-{safe_name(name)}-") as tmp:
        view = ConfigView(config.model_copy(deep=True), spec.reads, spec.name)
        ctx = StepContext(spec, view, store, inputs, params, prefix, run_id, Path(tmp) / "out", Path(tmp) / "tmp")
        ctx.out_dir.mkdir()
        ctx.tmp_dir.mkdir()
        try:
            result = spec.fn(ctx)
            check_outputs(spec, result)
        except Exception as exc:
            _record_failure(ctx, exc)
            raise
        finished = time.time()
        outputs = {
            k: (output_uri(prefix, v) if isinstance(v, str) else [output_uri(prefix, x) for x in v])
            for k, v in result.files.items()
        }
        manifest = store.publish(
            prefix,
            ctx.out_dir,
            {
                "step": name,
                "version": spec.version,
                "cache_key": key,
                "prefix": prefix,
                "outputs": outputs,
                "metrics": result.metrics,
                "inputs": inputs,
                "input_digests": digests,
                "params": params,
                "config": material["config"],
                "config_files": material["config_files"],
                "code": material["code"],
                "pipeline": config.name,
                "run_id": run_id,
                "code_version": code_version(),
                "config_dir": str(config_dir()),
                "host": socket.gethostname(),
                "timings": {"started": started, "finished": finished, "seconds": round(finished - started, 3),
                            "cpus": os.cpu_count()},
                "cost": ctx.cost,
            },
        )
        shutil.rmtree(ctx.out_dir, ignore_errors=True)
    _record_use(store, config, run_id, name, prefix)
    log.info("%s: published %d files in %.1fs", name, len(manifest["files"]), finished - started)
    return StepResult(name, outputs, result.metrics, join_uri(prefix, "_manifest.json"), False)


def check_outputs(spec: StepSpec, result: StepOutput) -> None:
    """A step returns exactly its declared outputs (optional ones may be left out)."""
    got = set(result.files)
    missing, extra = sorted(set(spec.outputs) - got), sorted(got - set(spec.all_outputs))
    if missing or extra:
        optional = f" (optional {list(spec.optional_outputs)})" if spec.optional_outputs else ""
        raise StepFailed(f"{spec.name}: returned outputs {sorted(got)} differ from the declared {list(spec.outputs)}"
                         + optional + (f"; missing {missing}" if missing else "")
                         + (f"; undeclared {extra}" if extra else ""))


def output_uri(prefix: str, rel: str) -> str:
    """The URI of an output path; a directory output (``model/``) keeps its trailing slash, and an
    ``s3://`` value (an input passed on unchanged, e.g. a model a gate did not replace) stays as is."""
    if rel.startswith("s3://"):
        return rel
    return join_uri(prefix, rel) + ("/" if rel.endswith("/") else "")


def _record_use(store: ArtifactStore, config: PipelineConfig, run_id: str, name: str, prefix: str) -> None:
    """Note under ``_runs/<run_id>/steps/`` that this run used this result (fresh or cached)."""
    marker = f"{safe_name(name)}-{prefix.rsplit('/', 1)[1]}.json"
    marker = store.uri(config.name, "_runs", safe_name(run_id), "steps", marker)
    store.put_json(marker, {"step": name, "manifest": join_uri(prefix, "_manifest.json"), "at": time.time()})


def used_manifests(store: ArtifactStore, pipeline_uri: str, run_id: str) -> list[str]:
    """Manifest URIs of every step result run ``run_id`` used, cached ones included."""
    prefix = join_uri(pipeline_uri, "_runs", safe_name(run_id), "steps") + "/"
    return [store.get_json(u)["manifest"] for u in store.list(prefix)]


def _record_failure(ctx: StepContext, exc: BaseException) -> None:
    """Keep what a failed step wrote (e.g. its quarantine) under ``_failed/``, never as a result."""
    try:
        for path in ctx.out_dir.rglob("*"):
            if path.is_file():
                ctx.store.upload(path, join_uri(ctx.prefix, "_failed", path.relative_to(ctx.out_dir).as_posix()))
        ctx.store.put_json(
            join_uri(ctx.prefix, "_failed", "error.json"),
            {"error": str(exc), "type": type(exc).__name__, "traceback": traceback.format_exc(),
             "run_id": ctx.run_id, "at": time.time()},
        )
    except Exception:  # the original error matters more than a failed upload of its context
        log.exception("could not record the failure of %s", ctx.spec.name)
