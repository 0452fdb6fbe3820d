"""PreloadLocalExecutor: what it imports before the workers fork, and that the local stack runs it."""

from __future__ import annotations

import multiprocessing
import sys

import pytest

pytest.importorskip("airflow")


def test_preload_imports_what_it_can_and_names_what_it_cannot():
    from cogumi_provider.executors import preload

    imported, failed = preload(["json", "cogumi_no_such_module", "email.mime.text"])
    assert imported == ["json", "email.mime.text"]
    assert list(failed) == ["cogumi_no_such_module"] and failed["cogumi_no_such_module"].startswith(
        "ModuleNotFoundError")


def test_start_imports_before_the_workers_fork(tmp_path, monkeypatch):
    from airflow.executors.local_executor import LocalExecutor
    from cogumi_provider.executors import PreloadLocalExecutor

    (tmp_path / "cogumi_preload_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cogumi_preload_probe", raising=False)
    seen = []
    monkeypatch.setattr(LocalExecutor, "start", lambda self: seen.append("cogumi_preload_probe" in sys.modules))
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "fork")
    executor = PreloadLocalExecutor(parallelism=1)
    executor.preload_modules = ("cogumi_preload_probe",)
    executor.start()
    assert seen == [True]


def test_spawn_preloads_nothing(tmp_path, monkeypatch):
    from airflow.executors.local_executor import LocalExecutor
    from cogumi_provider.executors import PreloadLocalExecutor

    (tmp_path / "cogumi_preload_probe2.py").write_text("VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "cogumi_preload_probe2", raising=False)
    monkeypatch.setattr(LocalExecutor, "start", lambda self: None)
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda *a, **k: "spawn")
    executor = PreloadLocalExecutor(parallelism=1)
    executor.preload_modules = ("cogumi_preload_probe2",)
    executor.start()
    assert "cogumi_preload_probe2" not in sys.modules  # a spawned worker would not inherit it anyway


def test_the_local_stack_runs_it(tmp_path):
    import importlib

    from airflow.executors.local_executor import LocalExecutor

    from cogumi_tasks.stack import local

    settings = local.Settings.from_env({}, home=tmp_path / "home")
    assert local.env(settings)["AIRFLOW__CORE__EXECUTOR"] == local.PRELOAD_EXECUTOR
    module, name = local.PRELOAD_EXECUTOR.rsplit(".", 1)
    assert issubclass(getattr(importlib.import_module(module), name), LocalExecutor)
