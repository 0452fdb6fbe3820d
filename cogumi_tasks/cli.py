"""The ``cogumi`` command: run any step the same way everywhere, and drive the local stack.

    cogumi run-step data.dedup --config tiny --input scored=s3://... --run-id R --output-json out.json
    cogumi steps | cogumi status [--config tiny] | cogumi report [RUN] | cogumi stack up|down|status | cogumi demo
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from cogumi_tasks.core.config import ConfigError, PipelineConfig, load_config, parse_set_flags
from cogumi_tasks.core.secrets import install_log_filter, redact


def _parse_inputs(pairs: list[str], inputs_json: str | None) -> dict:
    inputs = _json_object("--inputs-json", inputs_json)
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--input {pair!r}: expected NAME=URI")
        if name in inputs:  # repeated names make a list
            prev = inputs[name]
            inputs[name] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            inputs[name] = value
    return inputs


def json_arg(flag: str, text: str) -> Any:
    """The value of a JSON command-line argument; malformed JSON is a ConfigError naming the flag."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{flag}: not JSON ({exc.msg} at column {exc.colno}): {text[:80]!r}; a string value "
                          "needs double quotes") from None


def _json_object(flag: str, text: str | None) -> dict:
    value = json_arg(flag, text) if text else {}
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def run_step_argv(step: str, *, config_name: str, run_id: str, inputs: dict, params: dict, overrides: dict,
                  output_json: str | None = None) -> list[str]:
    """The ``cogumi run-step`` command line for exactly these values (what a pod or remote worker runs).

    Inputs, params and config overrides each travel as one JSON object, decoded by :func:`step_call`,
    so the command sees the same types as an in-process run (``True``, ``None``, ``"007"``, ``1.0``)
    and computes the same cache key."""
    argv = ["cogumi", "run-step", step, "--config", config_name, "--run-id", run_id,
            "--inputs-json", json.dumps(inputs), "--set-json", json.dumps(overrides),
            "--params-json", json.dumps(params)]
    return argv + (["--output-json", output_json] if output_json else [])


def step_call(args: argparse.Namespace) -> tuple[PipelineConfig, dict, dict]:
    """The config, inputs and params a ``run-step`` command line asks for.

    ``--set KEY=VALUE`` values are read as YAML scalars, like any override; ``--param KEY=VALUE``
    values are JSON (a string in double quotes); ``--set-json`` / ``--params-json`` objects are taken
    as they are and win over single flags."""
    overrides = {**parse_set_flags(args.set), **_json_object("--set-json", args.set_json)}
    params = {}
    for pair in args.param:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"--param {pair!r}: expected KEY=VALUE")
        params[key.strip()] = json_arg(f"--param {pair}", value)
    params.update(_json_object("--params-json", args.params_json))
    return load_config(args.config, overrides), _parse_inputs(args.input, args.inputs_json), params


def step_payload(result: Any) -> dict[str, Any]:
    """What a step run hands downstream (XCom, ``--output-json``): its manifest URI, whether it was a
    cached result, and each output's URI(s)."""
    return {"manifest": result.manifest_uri, "skipped": result.skipped, **result.outputs}


def cmd_run_step(args: argparse.Namespace) -> int:
    from cogumi_tasks.core.steps import run_step

    config, inputs, params = step_call(args)
    result = run_step(args.step, config, inputs, params=params, run_id=args.run_id, force=args.force)
    text = json.dumps(step_payload(result), indent=1)
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(text)
    print(text)
    return 0


def cmd_steps(args: argparse.Namespace) -> int:
    from cogumi_tasks.core.steps import all_steps

    steps = all_steps()
    if args.name:
        if args.name not in steps:
            raise ConfigError(f"no step named {args.name!r}; known: {', '.join(sorted(steps))}")
        spec = steps[args.name]
        print(f"{spec.name} v{spec.version}\n\n{spec.doc}\n")
        declared = {"reads (config in the cache key)": spec.reads, "inputs": spec.inputs, "outputs": spec.outputs,
                    "optional outputs": spec.optional_outputs, "code (source in the cache key)": spec.code,
                    "inputs named in config": [f"{k} <- {v}" for k, v in spec.config_inputs]}
        for label, values in declared.items():
            print(f"{label}: {', '.join(values) if values else '-'}")
        return 0
    for name, spec in sorted(steps.items()):
        first = spec.doc.splitlines()[0] if spec.doc else ""
        print(f"{name:24s} v{spec.version}  {first}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """What ran (one line per published step result), what it cost, and where the outputs are."""
    from rich.console import Console
    from rich.table import Table

    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.ledger import read_run_ledger, summarize

    config = load_config(args.config, parse_set_flags(args.set))
    store = ArtifactStore(config.storage)
    table = Table(title=f"pipeline {config.name}: published steps (s3://{config.storage.bucket}/{config.name}/)")
    for col in ("finished", "step", "seconds", "usd", "outputs"):
        table.add_column(col)
    manifests = [store.get_json(u) for u in store.list(store.uri(config.name) + "/") if u.endswith("/_manifest.json")]
    for m in sorted(manifests, key=lambda m: m["timings"]["finished"]):
        outs = ", ".join(f"{k}={v if isinstance(v, str) else f'[{len(v)} files]'}" for k, v in m["outputs"].items())
        table.add_row(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["timings"]["finished"])), m["step"],
                      f"{m['timings']['seconds']:.1f}", f"{m.get('cost', {}).get('usd', 0):.5f}", outs)
    console = Console()
    console.print(table)
    runs_prefix = store.uri(config.name, "_runs") + "/"
    run_ids = sorted({u[len(runs_prefix):].split("/")[0] for u in store.list(runs_prefix)})
    for run_id in run_ids[-args.runs:]:
        totals = summarize(read_run_ledger(store, store.uri(config.name, "_runs", run_id, "ledger")))
        console.print(f"run {run_id}: {totals['calls']} LLM calls ({totals['cached_calls']} from cache), "
                      f"{totals['prompt_tokens']}+{totals['completion_tokens']} tokens, ${totals['usd']:.5f}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """One self-contained HTML page (and JSON) for a pipeline run, built from its manifests in S3."""
    from cogumi_tasks.core.artifacts import ArtifactStore
    from cogumi_tasks.core.config import config_dir
    from cogumi_tasks.eval.report import write_report

    config = load_config(args.config, parse_set_flags(args.set))
    store = ArtifactStore(config.storage)
    targets = Path(args.targets) if args.targets else config_dir() / "plan_targets.yaml"
    try:
        html_path, json_path = write_report(store, config.name, args.run_id, Path(args.out_dir), targets)
    except LookupError as exc:
        print(f"cogumi report: {exc}", file=sys.stderr)
        return 1
    print(f"report: {html_path}\nnumbers: {json_path}")
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from cogumi_tasks.stack.local import cli_stack

    return cli_stack(args.action)


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from cogumi_tasks.stack.demo import cli_demo

    return cli_demo(rest)


def cmd_backfill(args: argparse.Namespace, rest: list[str]) -> int:
    from cogumi_tasks.stack.backfill import cli_backfill

    return cli_backfill(rest)


def cmd_chat(args: argparse.Namespace) -> int:
    import os

    key = os.environ.get(args.api_key_env)
    if not key:
        print(f"cogumi chat: no API key: set {args.api_key_env} (one of the gateway's keys) or name another "
              f"variable with --api-key-env", file=sys.stderr)
        return 2
    from cogumi_tasks.serve.chat import launch_chat

    print(f"chat UI: http://{args.host}:{args.port}/ (gateway {args.api})")
    launch_chat(args.api, key, host=args.host, port=args.port)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from cogumi_tasks.serve.run import serve

    config = load_config(args.config, parse_set_flags(args.set))
    try:
        return serve(config, args.release, args.host, args.port)
    except ValueError as exc:  # a release that does not verify, no API keys: the message names what is wrong
        print(f"cogumi serve: {one_line(exc)}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogumi", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run-step", help="run one registered step (or reuse its cached result)")
    r.add_argument("step")
    r.add_argument("--config", default="tiny", help="config name in configs/ or a YAML path")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    r.add_argument("--input", action="append", default=[], metavar="NAME=URI", help="repeat a name for a list")
    r.add_argument("--inputs-json", help="all inputs as one JSON object")
    r.add_argument("--set-json", metavar="JSON", help="config overrides as one JSON object {dotted key: value}")
    r.add_argument("--param", action="append", default=[], metavar="KEY=JSON", help='a step param, e.g. n=3 or '
                   'tag=\'"a"\'')
    r.add_argument("--params-json", metavar="JSON", help="all step params as one JSON object")
    r.add_argument("--run-id", default="manual")
    r.add_argument("--output-json", help="also write the outputs here (e.g. /airflow/xcom/return.json)")
    r.add_argument("--force", action="store_true", help="run even if a cached result exists")
    r.set_defaults(fn=cmd_run_step)

    st = sub.add_parser("steps", help="list registered steps, or one step's declarations")
    st.add_argument("name", nargs="?", help="a step: print what it reads, takes, returns and hashes")
    st.set_defaults(fn=cmd_steps)

    s = sub.add_parser("status", help="what ran, what it cost, where the outputs are")
    s.add_argument("--config", default="tiny")
    s.add_argument("--set", action="append", default=[])
    s.add_argument("--runs", type=int, default=5, help="how many recent runs' ledgers to total")
    s.set_defaults(fn=cmd_status)

    rp = sub.add_parser("report", help="the run report (HTML + JSON) from the manifests in S3")
    rp.add_argument("run_id", nargs="?", default=None, help="an Airflow run id (default: the latest run)")
    rp.add_argument("--config", default="tiny")
    rp.add_argument("--set", action="append", default=[])
    rp.add_argument("--out-dir", default=".cogumi/reports")
    rp.add_argument("--targets", help="plan targets YAML (default: configs/plan_targets.yaml)")
    rp.set_defaults(fn=cmd_report)

    st = sub.add_parser("stack", help="the local stack on 127.0.0.1")
    st.add_argument("action", choices=["up", "down", "status", "serve"])
    st.set_defaults(fn=cmd_stack)

    ch = sub.add_parser("chat", help="the Gradio chat UI in front of a running gateway")
    ch.add_argument("--api", default="http://127.0.0.1:8400/v1", help="the gateway's OpenAI-compatible base URL")
    ch.add_argument("--api-key-env", default="COGUMI_API_KEY", help="the environment variable holding an API key")
    ch.add_argument("--host", default="127.0.0.1", help="the UI's address (loopback unless exposed on purpose)")
    ch.add_argument("--port", type=int, default=7860)
    ch.set_defaults(fn=cmd_chat)

    sv = sub.add_parser("serve", help="the routed OpenAI-compatible API (engine + gateway) of a release")
    sv.add_argument("--release", default="current", help="a release directory, its s3:// prefix, or `current` "
                    "(the registry's releases/current.json)")
    sv.add_argument("--config", default="tiny")
    sv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sv.add_argument("--host", help="default: serve.host (127.0.0.1)")
    sv.add_argument("--port", type=int, help="default: serve.port")
    sv.set_defaults(fn=cmd_serve)

    sub.add_parser("demo", help="start the local stack and run the pipeline through Airflow", add_help=False)
    sub.add_parser("backfill", help="re-run a failed Phase 3 tier through Airflow (phase3 --modifier M --tier K)",
                   add_help=False)
    return p


def _local_stack_credentials() -> None:
    """Without S3 credentials in the environment, use the local stack's (``make demo``), if it has been set up."""
    import os

    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return
    from cogumi_tasks.stack import local

    settings = local.Settings.from_env()
    if settings.secrets_file.exists():
        creds = local.s3_credentials(settings)
        os.environ["AWS_ACCESS_KEY_ID"] = creds["aws_access_key_id"]
        os.environ["AWS_SECRET_ACCESS_KEY"] = creds["aws_secret_access_key"]


def one_line(exc: BaseException) -> str:
    """An error's message on one line (a multi-line listing joined with ``; ``), secret values redacted."""
    return redact("; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    install_log_filter()  # no secret value in any log line
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return cmd_demo(argparse.Namespace(), argv[1:])
    if argv[:1] == ["backfill"]:
        return cmd_backfill(argparse.Namespace(), argv[1:])
    args = build_parser().parse_args(argv)
    from botocore.exceptions import NoCredentialsError

    from cogumi_tasks.core.artifacts import ArtifactError
    from cogumi_tasks.core.ledger import BudgetExceeded
    from cogumi_tasks.core.records import ErrorRateExceeded, RecordError
    from cogumi_tasks.core.steps import StepFailed
    from cogumi_tasks.eval.suites import SuiteError

    _local_stack_credentials()
    try:
        return args.fn(args)
    except ConfigError as exc:
        print(f"cogumi: {one_line(exc)}", file=sys.stderr)
        return 2
    except (StepFailed, ErrorRateExceeded, RecordError, SuiteError, BudgetExceeded, ArtifactError) as exc:
        # the message names the file, line and field; a traceback would only bury it
        print(f"cogumi: {getattr(args, 'step', args.command)} failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except NoCredentialsError:
        print("cogumi: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the local stack's are "
              "in .cogumi/secrets.env once `make demo` has run)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
