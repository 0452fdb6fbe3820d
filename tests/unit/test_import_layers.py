"""The import-linter contracts of pyproject.toml (run by `make lint`): kept by the library as it is, broken by a
planted upward import, a planted import between phase packages, and a planted Airflow import.

Each case runs `lint-imports` on a copy of the package in a temporary directory (first on ``PYTHONPATH``), so
nothing in the checkout changes. The planted import sits inside a function: import-linter sees those too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "cogumi_tasks", tmp_path / "cogumi_tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _lint(root: Path) -> subprocess.CompletedProcess:
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: install the dev extra (make install)"
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "200"}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def _plant(root: Path, module: str, statement: str) -> None:
    path = root / module
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {statement}\n")


def test_library_keeps_every_contract(tmp_path):
    proc = _lint(_copy(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "cogumi_tasks layers KEPT" in out and "the library never imports Airflow KEPT" in out
    assert "BROKEN" not in out


@pytest.mark.parametrize(("module", "statement", "contract", "message"), [
    ("cogumi_tasks/core/config.py", "from cogumi_tasks.stack import local  # noqa: F401",
     "cogumi_tasks layers", "cogumi_tasks.core is not allowed to import cogumi_tasks.stack"),
    ("cogumi_tasks/eval/backends.py", "from cogumi_tasks.train import lora  # noqa: F401",
     "cogumi_tasks layers", "cogumi_tasks.eval is not allowed to import cogumi_tasks.train"),
    ("cogumi_tasks/llm/client.py", "import airflow  # noqa: F401",
     "the library never imports Airflow", "cogumi_tasks.llm.client -> airflow"),
], ids=["upward", "between-phases", "airflow"])
def test_planted_import_breaks_its_contract(tmp_path, module, statement, contract, message):
    root = _copy(tmp_path)
    _plant(root, module, statement)
    proc = _lint(root)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"{contract} BROKEN" in out, out
    assert message in out, out
    assert "Contracts: 1 kept, 1 broken." in out, out
