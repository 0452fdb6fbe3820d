"""The Airflow UI in a real browser (headless Chromium, tests/browser.py) against a throwaway local stack.

Log in as admin, trigger ``phase0_dataset`` from its params form with a prompt limit of 1, see the run succeed and a
``generate`` task's log show its progress line. Then, with the teacher answering only 500s (a fault proxy in front of
llama.cpp), a run with a prompt limit of 2 fails in ``generate``; with the teacher back, clearing that task in the UI
makes the run finish, and only the one prompt that never got an answer is sent to the teacher again. Screenshots of
each step are kept under test-artifacts/airflow-ui/.
"""

from __future__ import annotations

import re
import time
from urllib.parse import unquote

import httpx
import pytest
import yaml

from cogumi_tasks.stack.demo import follow
from tests.browser import chromium_page, shot
from tests.conftest import REPO
from tests.servers.fault_proxy import proxy_stats
from tests.servers.stack import throwaway_stack

pytestmark = [pytest.mark.stack, pytest.mark.e2e, pytest.mark.timeout(1800)]
DAG = "phase0_dataset"
SHOTS = "airflow-ui"


def _config(proxies: dict[str, str]) -> dict:
    """tiny.yaml on general prompts only: the cheap teacher (behind the proxy) answers them, in one shard."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["name"] = "ui"
    data["llm"].update({"max_retries": 1, "backoff_base_s": 0.05, "backoff_max_s": 0.1})
    data["teachers"][0].update({"base_url": proxies["teacher"] + "/v1", "weight": 1.0})
    data["dataset"]["prompts"].update({"shards": 1, "world": {"families": {}, "seed": 0}})
    data["dataset"]["generate"]["max_tokens"] = 16
    return data


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with throwaway_stack(tmp_path_factory.mktemp("ui"), (DAG,), {"teacher": "llm"}, _config) as st:
        yield st


def _faults(proxy: str, only: str | None) -> None:
    httpx.post(proxy + "/_faults", json={"only": only}, timeout=10, trust_env=False).raise_for_status()


def _log_in(page, url: str, password: str) -> None:
    page.goto(f"{url}/dags/{DAG}")
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(rf"/dags/{DAG}"))


def _trigger_from_form(page, url: str, limit: int, name: str) -> str:
    """Open the DAG, fill the trigger form's prompt limit, submit; the new run's id (the UI opens its page)."""
    page.goto(f"{url}/dags/{DAG}")
    page.get_by_role("button", name="Trigger").first.click()
    form = page.get_by_role("dialog")
    form.get_by_role("spinbutton", name="Prompt limit").fill(str(limit))
    shot(page, f"{SHOTS}/{name}")
    form.get_by_role("button", name="Trigger").click()
    page.wait_for_url(re.compile(r"/runs/[^/]+$"))
    run_id = unquote(page.url.rsplit("/runs/", 1)[1])
    page.goto("about:blank")  # the run page polls the API server; the test follows the run through REST
    return run_id


def _ti_url(url: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    mapped = f"/mapped/{map_index}" if map_index >= 0 else ""
    return f"{url}/dags/{DAG}/runs/{run_id}/tasks/{task_id}{mapped}"


def test_trigger_follow_and_clear_in_the_ui(stack):
    api, url, proxy = stack.api, stack.settings.airflow_url, stack.proxies["teacher"]
    with chromium_page(f"{SHOTS}/test") as page:
        _log_in(page, url, stack.password)

        # a run from the params form, its success, and a task's log with the progress line
        run_id = _trigger_from_form(page, url, 1, "01-trigger-form")
        assert api.run(DAG, run_id)["conf"]["prompt_limit"] == 1
        state, tis = follow(api, DAG, run_id, timeout_s=900)
        assert state == "success", {(t["task_id"], t["map_index"]): t["state"] for t in tis}
        manifest = stack.store.get_json(api.xcom(DAG, run_id, "prompts", key="manifest"))
        assert manifest["metrics"]["prompts"] == 1
        page.goto(_ti_url(url, run_id, "generate", 0))
        page.get_by_text(re.compile(r"data\.generate \[teacher-a\]: 1/1 done")).wait_for()
        shot(page, f"{SHOTS}/02-task-log")

        # the teacher goes down: the next run (one more prompt) fails in generate after its tries
        forwarded = proxy_stats(proxy)["forwarded"]
        _faults(proxy, "500")
        run_id = _trigger_from_form(page, url, 2, "03-trigger-form-limit-2")
        state, tis = follow(api, DAG, run_id, timeout_s=900)
        by_id = {(t["task_id"], t["map_index"]): t for t in tis}
        assert state == "failed" and by_id[("generate", 0)]["state"] == "failed", by_id
        assert proxy_stats(proxy)["forwarded"] == forwarded  # the first prompt's answer came from the cache
        tries = {k: t["try_number"] for k, t in by_id.items()}

        # the teacher is back: clear the failed task in the UI, with the tasks that wait on it
        _faults(proxy, None)
        page.goto(_ti_url(url, run_id, "generate", 0))
        page.get_by_text(re.compile(r"1 of 2 prompts got no usable answer")).first.wait_for()
        shot(page, f"{SHOTS}/04-failed-task-log")
        page.get_by_role("button", name="Press shift+c to clear", exact=True).click()
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Affected Tasks: 4").wait_for()  # generate[0], then score, dedup, publish
        shot(page, f"{SHOTS}/05-clear-dialog")
        dialog.get_by_role("button", name="Confirm").click()
        dialog.wait_for(state="hidden")
        deadline = time.monotonic() + 60  # the clear puts the run back to queued; follow() returns on "failed"
        while api.run_state(DAG, run_id) == "failed" and time.monotonic() < deadline:
            time.sleep(0.5)
        state, tis = follow(api, DAG, run_id, timeout_s=900)
        after = {(t["task_id"], t["map_index"]): t for t in tis}
        assert state == "success", {k: t["state"] for k, t in after.items()}
        page.goto(_ti_url(url, run_id, "generate", 0))
        page.get_by_text(re.compile(r"data\.generate \[teacher-a\]: 2/2 done .*, 1 from cache")).wait_for()
        shot(page, f"{SHOTS}/06-cleared-task-log")
        page.goto(f"{url}/dags/{DAG}/runs/{run_id}")
        page.get_by_role("row", name=re.compile(r"^generate 0 Success")).wait_for()
        shot(page, f"{SHOTS}/07-cleared-run")

    assert after[("prompts", -1)]["try_number"] == tries[("prompts", -1)]  # not run again
    assert after[("generate", 0)]["try_number"] > tries[("generate", 0)]
    assert proxy_stats(proxy)["forwarded"] == forwarded + 1  # only the prompt that never got an answer
