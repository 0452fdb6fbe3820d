"""``cogumi backfill phase3 --modifier code --tier 2 [--run RUN_ID]``: re-run a failed modifier tier;
``cogumi backfill recalibrate --from 2026-11-28 --to 2026-11-30``: run missed re-calibration intervals.

Clearing a task through Airflow's REST API is what the UI's "Clear" button does: the tier task and the tasks
after it (its modifier's train and compress, then evaluate and publish, which never ran) are cleared and the run
goes on; the other tiers and modifiers keep their results. The step's calls already answered come from the
response cache, so nothing paid is paid twice. Credentials: the local stack's (``make demo``), or
``COGUMI_AIRFLOW_URL``, ``COGUMI_AIRFLOW_USER`` and ``COGUMI_AIRFLOW_PASSWORD`` for another deployment.
"""

from __future__ import annotations

import argparse
import os

from cogumi_tasks.stack import local
from cogumi_tasks.stack.demo import RECALIBRATE_DAG, AirflowREST, DemoError, _q, follow

PHASE3_DAG = "phase3_modifiers"


def connect() -> AirflowREST:
    """A REST client for the deployment in the environment, else for the local stack."""
    url = os.environ.get("COGUMI_AIRFLOW_URL")
    if url:
        return AirflowREST(url, os.environ.get("COGUMI_AIRFLOW_USER", "admin"),
                           os.environ.get("COGUMI_AIRFLOW_PASSWORD", ""))
    s = local.Settings.from_env()
    if not s.secrets_file.exists():
        raise DemoError(f"no local stack ({s.secrets_file} is missing) and COGUMI_AIRFLOW_URL is not set")
    return AirflowREST(s.airflow_url, "admin", local.load_secrets(s)["COGUMI_AIRFLOW_PASSWORD"])


def latest_run(api: AirflowREST, dag_id: str) -> str:
    runs = api.request("GET", f"/dags/{_q(dag_id)}/dagRuns", params={"order_by": "-run_after", "limit": 1})
    if not runs["dag_runs"]:
        raise DemoError(f"{dag_id} has no runs")
    return runs["dag_runs"][0]["dag_run_id"]


def clear_tasks(api: AirflowREST, dag_id: str, run_id: str, task_ids: list[str]) -> list[dict]:
    """Clear ``task_ids`` of one run and everything downstream of them (only tasks that did not succeed are
    downstream of a failed one); returns the cleared task instances."""
    known = {ti["task_id"]: ti for ti in api.task_instances(dag_id, run_id)}
    missing = [t for t in task_ids if t not in known]
    if missing:
        raise DemoError(f"{dag_id} run {run_id} has no task {missing[0]!r} (tasks: {', '.join(sorted(known))})")
    body = {"dry_run": False, "dag_run_id": run_id, "task_ids": task_ids, "only_failed": False,
            "include_downstream": True, "reset_dag_runs": True}
    return api.request("POST", f"/dags/{_q(dag_id)}/clearTaskInstances", json=body)["task_instances"]


def create_backfill(api: AirflowREST, dag_id: str, from_date: str, to_date: str) -> dict:
    """Airflow 3's backfill of ``dag_id`` over the logical dates ``from_date`` .. ``to_date`` (inclusive, ISO 8601):
    one run per interval, one at a time, intervals that already have a run skipped (SQLite's "database locked"
    answers are retried by :meth:`AirflowREST.request`)."""
    body = {"dag_id": dag_id, "from_date": from_date, "to_date": to_date, "max_active_runs": 1,
            "reprocess_behavior": "none"}
    return api.request("POST", "/backfills", json=body)


def cli_backfill(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cogumi backfill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["phase3", "recalibrate"])
    p.add_argument("--modifier", help="phase3: a modifier name of the config (code, reasoning, ...)")
    p.add_argument("--tier", type=int, help="phase3: the cascade tier to re-run, 1-based")
    p.add_argument("--run", help="phase3: the DAG run id (default: the latest run of phase3_modifiers)")
    p.add_argument("--from", dest="from_date", help="recalibrate: the first missed interval's start (ISO 8601)")
    p.add_argument("--to", dest="to_date", help="recalibrate: the last missed interval's start (ISO 8601)")
    p.add_argument("--wait", action="store_true", help="follow the run until it ends")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    if args.phase == "recalibrate":
        if not (args.from_date and args.to_date):
            p.error("recalibrate needs --from and --to")
        try:
            made = create_backfill(connect(), RECALIBRATE_DAG, args.from_date, args.to_date)
        except DemoError as exc:
            print(f"cogumi backfill: {exc}")
            return 1
        print(f"backfill {made.get('id')} of {RECALIBRATE_DAG}: {args.from_date} .. {args.to_date} (its runs are "
              "named backfill__<logical date>; follow them in the UI's Runs tab)")
        return 0
    if args.modifier is None or args.tier is None:
        p.error("phase3 needs --modifier and --tier")
    try:
        api = connect()
        run_id = args.run or latest_run(api, PHASE3_DAG)
        task_id = f"{args.modifier}.tier_{args.tier}"
        cleared = clear_tasks(api, PHASE3_DAG, run_id, [task_id])
    except DemoError as exc:
        print(f"cogumi backfill: {exc}")
        return 1
    print(f"cleared {len(cleared)} task(s) of {PHASE3_DAG} run {run_id}: "
          + ", ".join(sorted(t["task_id"] for t in cleared)))
    if not args.wait:
        return 0
    state, _ = follow(api, PHASE3_DAG, run_id, args.timeout)
    print(f"run {run_id}: {state}")
    return 0 if state == "success" else 1
