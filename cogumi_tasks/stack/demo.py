"""``cogumi demo``: start the local stack, trigger a DAG through Airflow's REST API v2, follow it,
and print where the results are (dataset URI, metrics, UI address, logs)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any
from urllib.parse import quote

from cogumi_tasks.core.config import load_config
from cogumi_tasks.stack import local

TERMINAL = {"success", "failed", "upstream_failed", "skipped", "removed"}


class DemoError(RuntimeError):
    """The DAG cannot be found, triggered or followed."""


def _q(value: str) -> str:
    return quote(value, safe="")


class AirflowREST:
    """A small client for Airflow 3's REST API v2 with SimpleAuthManager's bearer tokens."""

    def __init__(self, base_url: str, username: str, password: str, timeout_s: float = 30, locked_tries: int = 10,
                 locked_wait_s: float = 3.0):
        import httpx

        self.locked_tries, self.locked_wait_s = locked_tries, locked_wait_s
        self.base_url = base_url.rstrip("/")
        self._auth = {"username": username, "password": password}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s, trust_env=False)
        self._login()

    def _login(self) -> None:
        resp = self.http.post("/auth/token", json=self._auth)
        if resp.status_code not in (200, 201):
            raise DemoError(f"POST /auth/token: HTTP {resp.status_code}: {resp.text[:300]}")
        self.http.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def request(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kw) -> Any:
        """JSON from ``/api/v2<path>``; ``None`` on 404 when 404 is in ``ok``. On SQLite the API answers 503, or
        500 "Database error", when another writer holds the database (its failed transaction is rolled back):
        that answer is retried ``locked_tries`` times, ``locked_wait_s`` apart (an unpause failed so in make demo)."""
        for attempt in range(1, self.locked_tries + 1):
            resp = self.http.request(method, "/api/v2" + path, **kw)
            if resp.status_code == 401:  # token expired: log in again once
                self._login()
                resp = self.http.request(method, "/api/v2" + path, **kw)
            locked = resp.status_code == 503 or (resp.status_code == 500 and "Database error" in resp.text)
            if not locked or attempt == self.locked_tries:
                break
            time.sleep(self.locked_wait_s)
        if resp.status_code == 404 and 404 in ok:
            return None
        if resp.status_code not in ok:
            raise DemoError(f"{method} /api/v2{path}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json() if resp.content else None

    # ------------------------------------------------------------ DAGs and runs
    def dag(self, dag_id: str) -> dict | None:
        return self.request("GET", f"/dags/{_q(dag_id)}", ok=(200, 404))

    def import_errors(self) -> list[dict]:
        return self.request("GET", "/importErrors", params={"limit": 100})["import_errors"]

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120) -> dict:
        """Wait until the dag-processor has parsed ``dag_id``; fail with its file's import errors."""
        t0 = time.monotonic()
        while True:
            dag, errors = self.dag(dag_id), self.import_errors()
            if dag is not None:
                files = {dag.get("fileloc"), dag.get("relative_fileloc")}
                mine = [e for e in errors if e.get("filename") in files]
                if mine:
                    raise DemoError(_format_import_errors(mine))
                return dag
            named = [e for e in errors if dag_id in str(e.get("filename", ""))]
            waited = time.monotonic() - t0
            if named or (errors and waited > 30):
                raise DemoError(f"DAG {dag_id!r} not loaded; import errors:\n" + _format_import_errors(
                    named or errors))
            if waited > timeout_s:
                raise DemoError(f"DAG {dag_id!r} not parsed after {timeout_s:.0f}s (in the dags folder?)")
            time.sleep(2)

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{_q(dag_id)}", json={"is_paused": False})

    def asset_run_since(self, dag_id: str, since: float) -> str | None:
        """The newest run of ``dag_id`` that an Asset event triggered after ``since`` (epoch seconds), if any."""
        from datetime import datetime

        runs = self.request("GET", f"/dags/{_q(dag_id)}/dagRuns", params={"order_by": "-run_after", "limit": 5})
        for run in runs["dag_runs"]:
            after = datetime.fromisoformat(run["run_after"].replace("Z", "+00:00")).timestamp()
            if run["run_type"] == "asset_triggered" and after >= since:
                return run["dag_run_id"]
        return None

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        body = {"logical_date": None, "conf": conf or {}}
        return self.request("POST", f"/dags/{_q(dag_id)}/dagRuns", json=body)["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.request("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}")

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.run(dag_id, run_id)["state"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Every task instance of the run, mapped ones included (one per map_index)."""
        out: list[dict] = []
        while True:
            page = self.request("GET", f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances",
                                params={"limit": 100, "offset": len(out)})
            out += page["task_instances"]
            if not page["task_instances"] or len(out) >= (page.get("total_entries") or 0):
                return out

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value",
             map_index: int = -1) -> Any:
        """The XCom value as JSON (the native value; ``deserialize=true`` would stringify it)."""
        path = f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/xcomEntries/{_q(key)}"
        entry = self.request("GET", path, params={"map_index": map_index})
        return entry["value"]

    def log_tail(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1,
                 lines: int = 40) -> str:
        path = f"/dags/{_q(dag_id)}/dagRuns/{_q(run_id)}/taskInstances/{_q(task_id)}/logs/{try_number}"
        data = self.request("GET", path, params={"map_index": map_index, "full_content": "true"},
                            headers={"Accept": "application/json"})
        content = data.get("content", [])
        if isinstance(content, str):
            return "\n".join(content.splitlines()[-lines:])
        out = []
        for ev in content:
            if not isinstance(ev, dict):
                out.append(str(ev))
                continue
            head = " ".join(str(ev[k]) for k in ("timestamp", "level") if ev.get(k))
            out.append(f"{head} {ev.get('event', '')}".strip())
            out += [f"    {line}" for line in _format_error(ev.get("error_detail") or ev.get("exception"))]
        return "\n".join(out[-lines:])


    def failure_line(self, dag_id: str, run_id: str, ti: dict) -> str:
        """The exception line of a failed task's log (e.g. the gate message with its figures)."""
        try:
            tail = self.log_tail(dag_id, run_id, ti["task_id"], ti["try_number"] or 1, ti.get("map_index", -1), 400)
        except DemoError as exc:
            return f"(no log: {exc})"
        errors = [x.strip() for x in tail.splitlines()
                  if ": " in x and x.strip().split(":")[0].endswith(("Failed", "Error"))]
        return errors[-1] if errors else tail.splitlines()[-1] if tail else "(empty log)"


def _format_error(detail: Any) -> list[str]:
    """Airflow 3 structured ``error_detail`` (a list of exceptions with frames) as a few lines."""
    if not detail:
        return []
    if not isinstance(detail, list):
        return str(detail).splitlines()
    out = []
    for exc in detail:
        if not isinstance(exc, dict):
            out.append(str(exc))
            continue
        frames = exc.get("frames") or []
        out += [f"{f.get('filename')}:{f.get('lineno')} in {f.get('name')}" for f in frames[-4:]]
        out.append(f"{exc.get('exc_type')}: {exc.get('exc_value')}")
    return out


def _format_import_errors(errors: list[dict]) -> str:
    return "\n".join(f"--- {e.get('filename')}\n{e.get('stack_trace', '').strip()}" for e in errors)


# ---------------------------------------------------------------- following a run
def _ti_label(ti: dict) -> str:
    return ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else "")


def _ti_state(ti: dict) -> str:
    """A TI's state; a scheduled one in a pool names the pool it waits on (it may wait for minutes)."""
    state = ti["state"] or "none"
    pool = ti.get("pool")
    return f"{state} (pool {pool})" if state == "scheduled" and pool and pool != "default_pool" else state


def _progress(tis: list[dict]) -> str:
    by_task: dict[str, list[dict]] = {}
    for ti in tis:
        by_task.setdefault(ti["task_id"], []).append(ti)
    parts = []
    for task_id, group in by_task.items():
        if len(group) > 1 or group[0].get("map_index", -1) >= 0:
            done = sum(t["state"] in TERMINAL for t in group)
            parts.append(f"{task_id}: {done}/{len(group)} mapped done")
        else:
            parts.append(f"{task_id}: {_ti_state(group[0])}")
    return "; ".join(parts)


def follow(api: AirflowREST, dag_id: str, run_id: str, timeout_s: float, poll_s: float = 2,
           summary_every_s: float = 10, log=print) -> tuple[str, list[dict]]:
    """Print task state changes and a progress line every ~10 s; return the final run state and TIs."""
    seen: dict[tuple[str, int], str | None] = {}
    t0 = last_summary = time.monotonic()
    while True:
        state = api.run_state(dag_id, run_id)
        tis = api.task_instances(dag_id, run_id)
        order = sorted(tis, key=lambda t: (t.get("start_date") or "~", t["task_id"], t.get("map_index", -1)))
        for ti in order:
            key = (ti["task_id"], ti.get("map_index", -1))
            if seen.get(key, None) != ti["state"]:
                seen[key] = ti["state"]
                dur = f" ({ti['duration']:.1f}s)" if ti.get("duration") is not None else ""
                log(f"  {_ti_label(ti)}: {_ti_state(ti)}{dur}")
        now = time.monotonic()
        if state in ("success", "failed"):
            return state, tis
        if now - last_summary >= summary_every_s:
            last_summary = now
            log(f"[{now - t0:5.0f}s] run {state}: {_progress(tis)}")
        if now - t0 > timeout_s:
            return "timeout", tis
        time.sleep(poll_s)


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def print_report(manifest: dict, title: str) -> None:
    """Outputs and metrics of a manifest as rich tables (generic: any keys)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    outputs = Table(title=f"{title}: outputs")
    outputs.add_column("output")
    outputs.add_column("uri")
    for name, uri in manifest.get("outputs", {}).items():
        outputs.add_row(name, uri if isinstance(uri, str) else ", ".join(map(str, uri)))
    console.print(outputs)
    table_rows = manifest.get("metrics", {}).get("rows")
    if isinstance(table_rows, list) and table_rows and all(isinstance(r, dict) for r in table_rows):
        cols = list(dict.fromkeys(k for r in table_rows for k in r if k != "bytes"))
        cols = sorted(cols, key=lambda c: (c != "stage", c != "gb"))
        short = {"bits_per_weight": "bits/w", "byte_ppl": "ppl/byte", "token_agreement": "agree"}
        table = Table(title=f"{title}: table")
        for col in cols:
            table.add_column(short.get(col, col), justify="left" if col == "stage" else "right")
        for r in table_rows:
            table.add_row(*("" if r.get(c) is None else f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])
                            for c in cols))
        console.print(table)
    metrics = Table(title=f"{title}: metrics")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    rows = _flatten({k: v for k, v in manifest.get("metrics", {}).items() if k != "rows" or not table_rows})
    if "cost" in manifest and not any(k.startswith("cost.") for k, _ in rows):
        rows += _flatten(manifest["cost"], "cost.")
    # nested detail (per endpoint, zero counters) stays in the manifest; the table shows what matters
    rows = [(k, v) for k, v in rows if ".per_endpoint." not in k and not (k.startswith("faults.") and v == 0)]
    for key, value in rows:
        metrics.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    console.print(metrics)


# ---------------------------------------------------------------- the demo
# The pipeline so far, in order: the dataset, the evaluation of the base student and its gates, then
# Phase 1 on the dataset, Phase 2 on Phase 1's model, Phase 3 on Phase 2's, Phase 4 on Phase 3's modifiers and
# Phase 5 on Phase 4's router (the runs their upstream Assets triggered). Phase 5's final task is validate: a
# promote refused by the gates is reported as a failed check, and the last promoted release (if any) is served.
DEMO_DAGS = ("phase0_dataset:publish", "evaluate:eval_run", "phase1_base:publish", "phase2_compression:publish",
             "phase3_modifiers:publish", "phase4_routing:publish", "phase5_deploy:validate")
GATES_FAILED = 3  # the run finished its work; a check after it (a quality gate) failed

def _wait_asset_run(api: AirflowREST, dag_id: str, since: float, timeout_s: float = 60) -> str | None:
    """The run an upstream Asset event created after ``since`` (the scheduler queues it within seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run_id = api.asset_run_since(dag_id, since)
        if run_id:
            return run_id
        time.sleep(3)
    return None


def run_demo(config: str = "tiny", conf: dict | None = None, timeout_s: float = 3600,
             dag_id: str = "phase0_dataset", final_task: str = "publish",
             settings: local.Settings | None = None, log=print, since: float | None = None) -> int:
    """Start the stack, trigger ``dag_id`` with ``{"config": config, **conf}``, follow it, report.

    An unpaused Asset-scheduled DAG (Phase 1 on Phase 0's dataset) is not triggered twice: the run an
    Asset event created after ``since`` is followed instead, when there is one."""
    s = settings or local.Settings.from_env()
    try:
        local.up(s, log=log)
        password = local.load_secrets(s)["COGUMI_AIRFLOW_PASSWORD"]
        api = AirflowREST(s.airflow_url, "admin", password)
        dag = api.wait_for_dag(dag_id)
        run_id = None
        if since is not None and dag.get("timetable_summary") == "Asset" and not dag.get("is_paused") \
                and config == local.env(s).get("COGUMI_CONFIG", "tiny"):
            run_id = _wait_asset_run(api, dag_id, since)
        api.unpause(dag_id)
        how = "the upstream Asset triggered" if run_id else "triggered"
        run_id = run_id or api.trigger(dag_id, {"config": config, **(conf or {})})
    except (local.ServiceError, DemoError) as exc:
        log(f"error: {exc}")
        return 1
    ui = f"{s.airflow_url}/dags/{dag_id}/runs/{run_id}"
    log(f"{how} {dag_id} run {run_id}\n  follow it in the UI: {ui}")
    state, tis = follow(api, dag_id, run_id, timeout_s, log=log)
    footer = (f"UI: {ui}  (login: admin, password: COGUMI_AIRFLOW_PASSWORD in {s.secrets_file})\n"
              f"logs: {s.logs_dir} (services), "
              f"{s.airflow_home / 'logs'} (tasks)\nstop the stack: make stop")
    final_ok = any(ti["task_id"] == final_task and ti["state"] == "success" for ti in tis)
    if state != "success" and not final_ok:
        log(f"run {run_id}: {state}")
        for ti in tis:
            if ti["state"] == "failed":
                log(f"--- log tail of {_ti_label(ti)} (try {ti['try_number']})")
                try:
                    log(api.log_tail(dag_id, run_id, ti["task_id"], ti["try_number"],
                                     ti.get("map_index", -1)))
                except DemoError as exc:
                    log(f"(no log: {exc})")
        write_run_report(_store(s), load_config(config).name, run_id, s, log)
        log(footer)
        return 1
    result = api.xcom(dag_id, run_id, final_task)
    log(f"run {run_id}: {state}")
    if isinstance(result, dict) and str(result.get("manifest", "")).startswith("s3://"):
        from cogumi_tasks.core.artifacts import ArtifactError

        store = _store(s)
        try:
            manifest = store.get_json(result["manifest"])
        except ArtifactError as exc:
            log(f"cannot read the manifest: {exc}")
            return 1
        dataset = manifest.get("outputs", {}).get("dataset")
        if dataset:
            log(f"dataset: {dataset}")
        print_report(manifest, f"{dag_id} / {final_task}")
        write_run_report(store, manifest.get("pipeline") or load_config(config).name, run_id, s, log)
    checks = [ti for ti in tis if ti["state"] == "failed"]
    for ti in checks:  # e.g. a quality gate after the final task: its verdict, not a crash
        log(f"{_ti_label(ti)} FAILED: {api.failure_line(dag_id, run_id, ti)}")
    log(footer)
    return GATES_FAILED if checks else 0


def _store(s: local.Settings):
    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import StorageConfig

    return ArtifactStore(StorageConfig(bucket=local.BUCKET, endpoint_url=s.s3_endpoint), local.s3_credentials(s))


def write_run_report(store, pipeline: str, run_id: str, s: local.Settings, log=print) -> None:
    """The run's HTML report (cogumi report) next to the logs; its path is printed."""
    from cogumi_tasks.eval.report import write_report

    try:
        html_path, _ = write_report(store, pipeline, run_id, s.home / "reports", s.config_dir / "plan_targets.yaml")
    except Exception as exc:  # the run succeeded; a report problem must not hide that
        log(f"(no report: {type(exc).__name__}: {exc})")
        return
    log(f"report: {html_path}")


def cli_demo(argv: list[str] | None = None) -> int:
    """``cogumi demo [--config tiny] [--limit N] [--budget USD] [--dag ID] [--final-task ID]``."""
    p = argparse.ArgumentParser(prog="cogumi demo", description=run_demo.__doc__)
    p.add_argument("--config", default="tiny", help="pipeline config name or path (default tiny)")
    p.add_argument("--limit", type=int, help="at most this many prompts (conf prompt_limit)")
    p.add_argument("--budget", type=float, help="spend cap in USD (conf budget_usd)")
    p.add_argument("--dag", action="append", metavar="DAG_ID:FINAL_TASK",
                   help="run these DAGs in order (default: " + ", ".join(DEMO_DAGS) + ")")
    p.add_argument("--timeout", type=float, default=10800,
                   help="seconds to follow each DAG run, its time queued behind the CPU pool included (default 3 h)")
    args = p.parse_args(argv)
    conf: dict[str, Any] = {}
    if args.limit is not None:
        conf["prompt_limit"] = args.limit
    if args.budget is not None:
        conf["budget_usd"] = args.budget
    rc, started = 0, time.time()
    for spec in args.dag or list(DEMO_DAGS):
        dag_id, _, final_task = spec.partition(":")
        rc = run_demo(args.config, conf, timeout_s=args.timeout, dag_id=dag_id, final_task=final_task or "publish",
                      since=started)
        if rc not in (0, GATES_FAILED):
            return rc
    if rc == GATES_FAILED:
        print("the pipeline ran; its quality gates failed (figures above and in the report)")
    if args.dag is None or any(d.startswith("phase5_deploy") for d in args.dag):
        rc = start_serving(args.config)
        schedule_recalibration()
        return rc
    return 0


def schedule_recalibration(log=print, settings: local.Settings | None = None) -> None:
    """Unpause DAG ``recalibrate`` (the deployment config's cron schedule) and print when it runs next and where
    to watch it; a stack without that DAG or a config without its section is reported, not an error."""
    s = settings or local.Settings.from_env()
    try:
        api = AirflowREST(s.airflow_url, "admin", local.load_secrets(s)["COGUMI_AIRFLOW_PASSWORD"])
        api.wait_for_dag(RECALIBRATE_DAG)
        api.unpause(RECALIBRATE_DAG)
        dag = api.dag(RECALIBRATE_DAG) or {}
    except (local.ServiceError, DemoError) as exc:
        log(f"re-calibration not scheduled: {exc}")
        return
    if not dag.get("timetable_summary") or dag.get("timetable_summary") == "None":
        log(f"re-calibration: the deployment config has no recalibrate section ({RECALIBRATE_DAG} is manual only)")
        return
    log(f"re-calibration: DAG {RECALIBRATE_DAG} runs on {dag['timetable_summary']!r}; next run after "
        f"{dag.get('next_dagrun_run_after')} for the served traffic of {dag.get('next_dagrun_data_interval_start')} "
        f".. {dag.get('next_dagrun_data_interval_end')}\n  see it in the UI: {s.airflow_url}/dags/{RECALIBRATE_DAG} "
        f"(its runs; each refit task's decision says what it measured and whether it published)")


RECALIBRATE_DAG = "recalibrate"


def start_serving(config: str, log=print) -> int:
    """Serve the registry's current release (the gateway, the chat UI, Prometheus) and print how to use it."""
    from cogumi_tasks.stack.serving import ServingPorts, serve_up, usage

    s = local.Settings.from_env()
    pointer = _store(s).uri(load_config(config).name, "releases", "current.json")
    if not _store(s).exists(pointer):
        log(f"no release is current ({pointer} does not exist): nothing to serve")
        return 0
    try:
        ports = serve_up(s, config, ServingPorts.from_env(dict(os.environ)), log=log)
    except local.ServiceError as exc:
        log(f"error: serving did not start: {exc} (logs in {s.logs_dir})")
        return 1
    for line in usage(s, ports):
        log(line)
    return 0
