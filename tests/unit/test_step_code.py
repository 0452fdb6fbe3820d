"""A step's cache key covers the source of the modules it declares in ``code``: this test finds the
project modules a step function uses (its own imports, the names it takes from its module's imports, and
the same for the functions of its own module that it calls) and fails naming any it left undeclared, so a
code change cannot leave a stale cached result behind. ``cogumi_tasks.core`` (the contract) is left out."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from functools import cache

import pytest

from cogumi_tasks.core.steps import all_steps


@cache
def module_tree(modname: str) -> ast.Module:
    return ast.parse(inspect.getsource(importlib.import_module(modname)))


def imported_names(modname: str) -> dict[str, str]:
    """Top-level ``from cogumi_tasks.x import name``: name -> module."""
    return {a.asname or a.name: node.module for node in module_tree(modname).body
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cogumi_tasks")
            for a in node.names}


def functions_of(modname: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in module_tree(modname).body if isinstance(n, ast.FunctionDef)}


def used_modules(modname: str, fn: ast.FunctionDef, seen: set[str]) -> set[str]:
    """Project modules ``fn`` uses, following calls to other functions of its own module."""
    seen.add(fn.name)
    names, local = imported_names(modname), functions_of(modname)
    out: set[str] = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cogumi_tasks"):
            out.add(node.module)
        elif isinstance(node, ast.Name):
            if node.id in names:
                out.add(names[node.id])
            elif node.id in local and node.id not in seen:
                out |= used_modules(modname, local[node.id], seen)
    return out


@pytest.mark.parametrize("name", sorted(all_steps()))
def test_every_module_a_step_uses_is_in_its_code(name):
    spec = all_steps()[name]
    fn = ast.parse(textwrap.dedent(inspect.getsource(spec.fn))).body[0]
    used = used_modules(spec.fn.__module__, fn, set())
    missing = sorted(m for m in used if not m.startswith("cogumi_tasks.core") and m not in spec.code)
    assert not missing, f"step {name} uses {missing} but does not declare them in @step(code=...)"


def test_cogumi_steps_prints_a_steps_declarations(capsys):
    from cogumi_tasks.cli import main

    assert main(["steps", "compress.export_gguf"]) == 0
    out = capsys.readouterr().out
    assert "reads (config in the cache key): compress.gguf, compress.prune.ppl_rows" in out
    assert "cogumi_tasks.compress.gguf" in out.split("code (source in the cache key):")[1]
    assert main(["steps", "compress.nope"]) == 2
    assert "no step named 'compress.nope'" in capsys.readouterr().err
