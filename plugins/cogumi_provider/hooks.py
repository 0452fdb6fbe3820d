"""CogumiHook: config loading, secrets from Airflow connections, and the three ways to run a step."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseHook

from cogumi_tasks.core.config import PipelineConfig, load_config
from cogumi_tasks.core.secrets import install_log_filter, register_connection, register_values, secret_values

XCOM_RETURN = "/airflow/xcom/return.json"


def plain_inputs(inputs: dict[str, Any]) -> dict[str, str | list[str]]:
    """Rendered inputs as plain URIs (lazy XCom sequences of mapped tasks become lists)."""
    out: dict[str, str | list[str]] = {}
    for name, value in inputs.items():
        if value is None:
            continue
        out[name] = value if isinstance(value, str) else [str(v) for v in value]
    return out


def asset_output(context: Any, operator: Any, ref: str) -> str | list[str]:
    """``"<asset name>:<output>"``: that output of the newest event of the task's inlet Asset of that name
    (what an earlier phase published)."""
    asset_name, _, output = ref.partition(":")
    inlet = next((a for a in getattr(operator, "inlets", None) or [] if getattr(a, "name", None) == asset_name), None)
    if inlet is None or not output:
        raise ValueError(f"{operator.task_id}: asset input {ref!r} needs the form '<asset>:<output>' and an inlet "
                         f"Asset of that name on the task")
    events = list(context["inlet_events"][inlet])
    if not events:
        raise ValueError(f"{operator.task_id}: Asset {asset_name} has no event yet: run the DAG that publishes it "
                         "first, or pass the input as a param")
    outputs = (events[-1].extra or {}).get("outputs", {})
    if output not in outputs:
        raise ValueError(f"{operator.task_id}: the newest {asset_name} event has no output {output!r} "
                         f"(has {sorted(outputs)})")
    return outputs[output]


class CogumiHook(BaseHook):
    """Loads the run's config and runs a step locally or in a Kubernetes pod.

    :param config_name: config in configs/ or a YAML path
    :param overrides: dotted config keys -> values
    """

    conn_name_attr = "cogumi_conn_id"
    hook_name = "Cogumi"

    def __init__(self, *, config_name: str, overrides: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.config_name = config_name
        self.overrides = overrides or {}

    def get_config(self) -> PipelineConfig:
        return load_config(self.config_name, self.overrides)

    # ------------------------------------------------------------ secrets
    def secret_env(self, config: PipelineConfig) -> dict[str, str]:
        """S3 credentials and endpoint keys from Airflow connections named in the config. Each connection's
        password, login and extra become secrets that manifests and logs mask (core.secrets)."""
        env: dict[str, str] = {}
        if config.storage.aws_conn_id:
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

            creds = AwsBaseHook(aws_conn_id=config.storage.aws_conn_id).get_credentials()
            env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = creds.access_key, creds.secret_key
            register_values(creds.secret_key, creds.token)
        for endpoint in config.endpoints():
            if endpoint.conn_id:
                conn = self.get_connection(endpoint.conn_id)
                register_connection(conn)
                env[endpoint.key_env] = conn.password or ""
        return env

    @staticmethod
    def mask_secrets() -> None:
        """Redact every secret value from this task's logs: cogumi's filter on the logging handlers, and
        Airflow's secrets masker for what Airflow itself logs."""
        from airflow.sdk.log import mask_secret

        install_log_filter()
        for value in secret_values():
            mask_secret(value)

    @staticmethod
    @contextmanager
    def _environ(extra: dict[str, str]) -> Iterator[None]:
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    # ------------------------------------------------------------ running
    def run_step(self, step: str, inputs: dict[str, Any], params: dict[str, Any], *, context: Any,
                 operator: Any) -> dict[str, Any]:
        """Run (or reuse) the step where the config places it; push outputs to XCom; return them."""
        config = self.get_config()
        inputs = plain_inputs(inputs)
        for name, output in (getattr(operator, "asset_inputs", None) or {}).items():
            if not inputs.get(name):
                inputs[name] = asset_output(context, operator, output)
        run_id = context["run_id"]
        target = config.compute.target(step)
        if target == "gpu_queue" and operator.queue != config.compute.gpu_queue:
            raise RuntimeError(
                f"{step}: config {config.name} places it on queue {config.compute.gpu_queue!r}, but this task "
                f"was parsed onto queue {operator.queue!r}; deploy with COGUMI_CONFIG={self.config_name}"
            )
        if target == "kubernetes":
            pod = self.pod_operator(step, inputs, params, run_id, config, task_id=operator.task_id)
            payload = pod.execute(context)
        else:
            from cogumi_tasks.core.steps import run_step

            with self._environ(self.secret_env(config)):
                self.mask_secrets()
                result = run_step(step, config, inputs, params=params, run_id=run_id)
            payload = {"manifest": result.manifest_uri, "skipped": result.skipped, **result.outputs}
        for key, value in payload.items():
            if key not in ("return_value",):
                context["ti"].xcom_push(key=key, value=value)
        for outlet in getattr(operator, "outlets", []) or []:
            context["outlet_events"][outlet].extra = {
                "manifest": payload["manifest"], "run_id": run_id,
                "outputs": {k: v for k, v in payload.items() if k not in ("manifest", "skipped")},
            }
        return payload

    def command(self, step: str, inputs: dict, params: dict, run_id: str) -> list[str]:
        """The ``cogumi run-step`` command line a pod or remote worker runs."""
        cmd = ["cogumi", "run-step", step, "--config", self.config_name, "--run-id", run_id,
               "--inputs-json", json.dumps(inputs, sort_keys=True), "--output-json", XCOM_RETURN]
        for key, value in sorted(self.overrides.items()):
            if value is not None and value != "":
                cmd += ["--set", f"{key}={value}"]
        for key, value in sorted(params.items()):
            cmd += ["--param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        return cmd

    def pod_operator(self, step: str, inputs: dict, params: dict, run_id: str, config: PipelineConfig,
                     task_id: str) -> Any:
        """A KubernetesPodOperator for the step: GPU limits, node selector, tolerations, secrets as env."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from airflow.providers.cncf.kubernetes.secret import Secret
        from kubernetes.client import models as k8s

        kube = config.compute.kubernetes
        resources = k8s.V1ResourceRequirements(
            requests={"cpu": kube.cpu, "memory": kube.memory},
            limits={"memory": kube.memory, **({"nvidia.com/gpu": str(kube.gpus)} if kube.gpus else {})},
        )
        secrets = [Secret("env", var, name, var) for name, variables in kube.secret_env.items() for var in variables]
        env = {"COGUMI_CONFIG_DIR": "/opt/cogumi/configs"}
        if config.storage.endpoint_url:
            env["COGUMI_S3_ENDPOINT"] = config.storage.endpoint_url
        cmd = self.command(step, inputs, params, run_id)
        return KubernetesPodOperator(
            task_id=f"{task_id}__pod",
            name=f"cogumi-{step.replace('.', '-').replace('_', '-')}",
            namespace=kube.namespace,
            image=kube.image,
            cmds=["bash", "-c"],
            arguments=[f"mkdir -p /airflow/xcom && {shlex.join(cmd)}"],
            env_vars=env,
            secrets=secrets,
            container_resources=resources,
            node_selector=dict(kube.node_selector),
            tolerations=[k8s.V1Toleration(**t) for t in kube.tolerations],
            service_account_name=kube.service_account,
            config_file=kube.config_file,
            in_cluster=kube.in_cluster if not kube.config_file else False,
            startup_timeout_seconds=kube.startup_timeout_s,
            labels={"app": "cogumi", "cogumi-step": step.replace(".", "-").replace("_", "-")},
            do_xcom_push=True,
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
        )
