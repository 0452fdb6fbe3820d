"""CogumiHook: a thin client of the cogumi library for the operator.

It loads the run's config, turns the Airflow connections the config names into environment variables
(or, for a pod, Kubernetes secrets), runs a step in this process, and writes the ``cogumi run-step``
command a pod runs. XCom, Assets and deferral are the operator's (:mod:`cogumi_provider.operators`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.sdk import BaseHook

from cogumi_tasks.core.config import ConfigError, PipelineConfig, load_config
from cogumi_tasks.core.secrets import install_log_filter, register_connection, register_values, secret_values


class CogumiHook(BaseHook):
    """The run's config, its secrets, a step run in this process, and the command a pod runs.

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

    def pod_secrets(self, config: PipelineConfig) -> list[Any]:
        """The pod's secret environment: each variable ``compute.kubernetes.secret_env`` lists, from its
        Kubernetes secret. A pod cannot read Airflow connections, so every key the config takes from one
        (an endpoint's ``conn_id``, ``storage.aws_conn_id``) must be among them: else a ConfigError names
        the endpoint and what to set."""
        from airflow.providers.cncf.kubernetes.secret import Secret

        kube = config.compute.kubernetes
        provided = {var for variables in kube.secret_env.values() for var in variables}
        missing = []
        if config.storage.aws_conn_id:
            lacking = [v for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if v not in provided]
            if lacking:
                missing.append(f"storage takes S3 credentials from Airflow connection {config.storage.aws_conn_id!r} "
                               f"(aws_conn_id): list {' and '.join(lacking)}")
        for endpoint in config.endpoints():
            if endpoint.conn_id and endpoint.key_env not in provided:
                missing.append(f"endpoint {endpoint.name!r} takes its key from Airflow connection "
                               f"{endpoint.conn_id!r} (conn_id): list {endpoint.key_env}")
        if missing:
            raise ConfigError(
                f"config {config.name}: a Kubernetes pod cannot read Airflow connections; {'; '.join(missing)} "
                "under compute.kubernetes.secret_env (<Kubernetes secret>: [VARIABLE, ...], the secret holding "
                "that value), or place the step off kubernetes in compute.steps")
        return [Secret("env", var, name, var) for name, variables in kube.secret_env.items() for var in variables]

    # ------------------------------------------------------------ running
    def run_step(self, step: str, config: PipelineConfig, inputs: dict[str, Any], params: dict[str, Any], *,
                 run_id: str) -> dict[str, Any]:
        """Run (or reuse) the step in this process, with the connections' secrets in its environment; its
        payload (manifest, skipped, output URIs)."""
        from cogumi_tasks.cli import step_payload
        from cogumi_tasks.core.steps import run_step

        with self._environ(self.secret_env(config)):
            self.mask_secrets()
            return step_payload(run_step(step, config, inputs, params=params, run_id=run_id))

    def command(self, step: str, inputs: dict, params: dict, run_id: str, output_json: str | None = None) -> list[str]:
        """The ``cogumi run-step`` command line that runs the step with this config, inputs and params."""
        from cogumi_tasks.cli import run_step_argv

        return run_step_argv(step, config_name=self.config_name, run_id=run_id, inputs=inputs, params=params,
                             overrides=self.overrides, output_json=output_json)
