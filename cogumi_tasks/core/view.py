"""What a step may read of the config: a frozen view of its declared keys, their values, the files they name.

A step declares dotted keys at any depth (``judge``, ``compress.prune.ppl_rows``). While it runs, ``ctx.config``
is a :class:`ConfigView` exposing only those keys (and ``name``); any other key raises
:class:`UndeclaredConfigKey`. :func:`view_values` is exactly what goes into the cache key, and
:func:`file_refs` lists the files those keys name (fields typed :data:`~cogumi_tasks.core.config.ConfigFile`),
whose contents are digested into the key too.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel

from cogumi_tasks.core.config import FileRef, PipelineConfig, Strict

ALWAYS = "name"  # the pipeline name: the first part of every prefix, so readable without declaring it


class UndeclaredConfigKey(RuntimeError):
    """A step read a config key it does not declare: a bug in the step, named with the fix."""


def covers(reads: tuple[str, ...] | frozenset[str], key: str) -> bool:
    """True when ``key`` is one of ``reads`` or lies under one (``judge`` covers ``judge.model``)."""
    return any(key == r or key.startswith(r + ".") for r in reads)


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    """The config model classes an annotation holds (``X | None`` -> [X]); lists and dicts are leaves."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [t for a in typing.get_args(annotation) for t in _model_types(a)]
    return []


def check_reads(step: str, reads: tuple[str, ...]) -> None:
    """Every declared key must name a field of :class:`PipelineConfig` (a misspelt key fails at registration)."""
    for dotted in reads:
        models: list[type[BaseModel]] = [PipelineConfig]
        for i, part in enumerate(dotted.split(".")):
            field = next((m.model_fields[part] for m in models if part in m.model_fields), None)
            if field is None:
                raise ValueError(f"step {step}: reads {dotted!r}: {'.'.join(dotted.split('.')[: i + 1])} is not a "
                                 "config key")
            models = _model_types(field.annotation)


def _is_file_field(field: Any) -> bool:
    def marked(annotation: Any) -> bool:
        if any(isinstance(m, FileRef) for m in getattr(annotation, "__metadata__", ())):
            return True
        return any(marked(a) for a in typing.get_args(annotation))

    return any(isinstance(m, FileRef) for m in field.metadata) or marked(field.annotation)


def _walk_files(node: Any, path: str, out: dict[str, str]) -> None:
    if isinstance(node, BaseModel):
        for name, field in type(node).model_fields.items():
            value = getattr(node, name)
            key = f"{path}.{name}" if path else name
            if _is_file_field(field):
                if isinstance(value, str) and value:
                    out[key] = value
            else:
                _walk_files(value, key, out)
    elif isinstance(node, list | tuple):
        for i, v in enumerate(node):
            _walk_files(v, f"{path}.{i}", out)
    elif isinstance(node, dict):
        for k, v in node.items():
            _walk_files(v, f"{path}.{k}", out)


def file_refs(config: PipelineConfig, reads: tuple[str, ...]) -> dict[str, str]:
    """Dotted key -> value of every file-valued field under the declared keys (``eval.suites.0.source``)."""
    out: dict[str, str] = {}
    _walk_files(config, "", out)
    return {k: v for k, v in sorted(out.items()) if covers(reads, k)}


def view_values(config: PipelineConfig, reads: tuple[str, ...]) -> dict[str, Any]:
    """The declared keys' values as plain data (a key under an absent section is None): the cache key's config."""
    data = config.model_dump(mode="json")
    out: dict[str, Any] = {}
    for dotted in sorted(reads):
        node: Any = data
        for part in dotted.split("."):
            node = None if node is None else node[part]
        out[dotted] = node
    return out


def _helper(cls: type, name: str) -> Any:
    """A method or property the project's config classes define (``teacher``), not pydantic's own."""
    for base in cls.__mro__:
        if base in (Strict, BaseModel, object):
            return None
        if name in vars(base) and not name.startswith("_"):
            return vars(base)[name]
    return None


class ConfigView:
    """Read-only access to the declared keys of a config (or of one of its sections).

    A declared key returns its real (frozen) value; a section with declared keys below it returns a view of
    that section; the config classes' own helpers (``teacher(name)``) run against the view, so they work
    exactly when the data they read is declared.
    """

    __slots__ = ("_node", "_path", "_reads", "_step")

    def __init__(self, node: BaseModel, reads: tuple[str, ...], step: str, path: str = "") -> None:
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_reads", tuple(reads))
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_path", path)

    def _undeclared(self, key: str) -> UndeclaredConfigKey:
        return UndeclaredConfigKey(
            f"step {self._step} read config key {key!r}, which it does not declare: declare it in reads "
            f"(@step({self._step!r}, reads=(..., {key!r}))); it declares {list(self._reads) or 'nothing'}")

    def __getattr__(self, name: str) -> Any:
        node = self._node
        if name.startswith("__"):
            raise AttributeError(name)
        helper = _helper(type(node), name)
        if helper is not None:
            return helper.__get__(self, type(node)) if hasattr(helper, "__get__") else helper
        if name not in type(node).model_fields:
            raise AttributeError(f"{type(node).__name__} has no field {name!r}")
        key = f"{self._path}.{name}" if self._path else name
        value = getattr(node, name)
        if covers(self._reads, key) or key == ALWAYS:
            return value
        if any(r.startswith(key + ".") for r in self._reads):
            return value if value is None or not isinstance(value, BaseModel) else ConfigView(
                value, self._reads, self._step, key)
        raise self._undeclared(key)

    def section(self, dotted: str) -> Any:
        """A declared key's value as plain data, as :meth:`PipelineConfig.section` gives it."""
        key = f"{self._path}.{dotted}" if self._path else dotted
        if not covers(self._reads, key):
            raise self._undeclared(key)
        node: Any = self._node.model_dump(mode="json")
        for part in dotted.split("."):
            node = None if node is None else node[part]
        return node

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"the config is read-only in step {self._step}")

    def __repr__(self) -> str:
        return f"ConfigView({self._path or 'config'}, step={self._step}, reads={list(self._reads)})"
