"""compute: kubernetes builds a real V1Pod (no cluster here: the spec itself is tested), whose command a
pod decodes to exactly the in-process config, inputs and params (the same cache key)."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import pytest

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
users: [{name: u, user: {token: dummy}}]
"""


def step_task(tmp_path, step: str, overrides: dict | None = None, **kwargs):
    """The task a DAG would declare for ``step`` under the production config, on a dummy kubeconfig."""
    from cogumi_provider.operators import CogumiStepOperator

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    return CogumiStepOperator(task_id=step.rsplit(".", 1)[1], step=step, config_name="production",
                              overrides={"compute.kubernetes.config_file": str(kubeconfig), **(overrides or {})},
                              **kwargs)


def pod_argv(spec) -> list[str]:
    """The command line the pod's container runs."""
    container = spec.spec.containers[0]
    assert container.command == ["bash", "-c"]
    return shlex.split(container.args[0].split("&&", 1)[1])


@pytest.fixture
def pod(tmp_path, airflow_db):
    task = step_task(tmp_path, "data.generate", {"llm.budget_usd": 50})
    config = task.hook.get_config()
    op = task.pod_operator(config, {"shard": "s3://cogumi/production/data.prompts/k/shard-0000.jsonl"},
                           "manual__2026")
    return op.build_pod_request_obj(context=None), config


def test_pod_runs_the_same_step_command(pod):
    spec, _ = pod
    argv = pod_argv(spec)
    assert argv[:3] == ["cogumi", "run-step", "data.generate"]
    assert argv[argv.index("--config") + 1] == "production"
    assert argv[argv.index("--output-json") + 1] == "/airflow/xcom/return.json"
    assert json.loads(argv[argv.index("--set-json") + 1])["llm.budget_usd"] == 50
    assert json.loads(argv[argv.index("--inputs-json") + 1]) == {
        "shard": "s3://cogumi/production/data.prompts/k/shard-0000.jsonl"}


def test_pod_requests_a_gpu_on_the_right_nodes(pod):
    spec, config = pod
    kube = config.compute.kubernetes
    container = spec.spec.containers[0]
    assert container.image == kube.image
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert spec.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    tolerations = [(t.key, t.operator, t.effect) for t in spec.spec.tolerations]
    assert tolerations == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert spec.metadata.namespace == "cogumi"


def test_secrets_come_from_kubernetes_secrets_not_values(pod):
    spec, _ = pod
    env = {e.name: e for e in spec.spec.containers[0].env}
    assert env["OPENAI_API_KEY"].value is None
    assert env["OPENAI_API_KEY"].value_from.secret_key_ref.name == "cogumi-teachers"
    assert env["AWS_SECRET_ACCESS_KEY"].value_from.secret_key_ref.name == "cogumi-s3"
    assert "sk-" not in str(spec)


def test_sft_under_production_runs_in_a_gpu_pod_with_the_same_step(tmp_path, airflow_db):
    """The operator's own decision: production.yaml places train.sft on kubernetes, and the pod it
    builds requests a GPU and runs ``cogumi run-step train.sft`` with the task's inputs."""
    task = step_task(tmp_path, "train.sft")
    config = task.hook.get_config()
    assert config.compute.target("train.sft") == "kubernetes" and task.target(config) == "kubernetes"
    inputs = {"model": "s3://cogumi/production/train.vocab_trim/k/model/",
              "dataset": "s3://cogumi/production/data.publish/k/dataset.jsonl"}
    op = task.pod_operator(config, inputs, "asset_triggered__2026")
    assert op.deferrable
    spec = op.build_pod_request_obj(context=None)
    container = spec.spec.containers[0]
    argv = pod_argv(spec)
    assert argv[:3] == ["cogumi", "run-step", "train.sft"]
    assert json.loads(argv[argv.index("--inputs-json") + 1]) == inputs
    assert argv[argv.index("--run-id") + 1] == "asset_triggered__2026"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert spec.metadata.labels["cogumi-step"] == "train-sft"


# Values whose type a text encoding loses: bools, None, ints vs floats, strings that read as numbers or
# booleans, nested lists and dicts.
PARAMS = {"flag": True, "off": False, "none": None, "n": 3, "x": 0.1, "whole": 2.0, "huge": 1e300, "zip": "007",
          "sci": "1e3", "word": "true", "neg": "-1", "empty": "", "list": [1, "2", None, False, 1.5],
          "nested": {"a": [1.5, {"b": "x", "c": None}], "d": {}}}
OVERRIDES = {"llm.budget_usd": 12.5, "dataset.prompts.limit": 7, "eval.judge_pairwise": False,
             "dataset.generate.temperature": 0, "dataset.generate.system_prompt": "1e3",
             "dataset.prompts.domains": ["code", "general"], "compute.kubernetes.node_selector": {"pool": "007"},
             "dataset.prompts.shards": None, "llm.batch_poll_s": ""}


def test_pod_command_decodes_to_the_in_process_values_and_cache_key(tmp_path, airflow_db):
    """The pod's argv, parsed by the real CLI parser, gives the config, inputs and params the in-process run
    uses, types included, so the pod computes the same cache key."""
    from cogumi_tasks.cli import build_parser, step_call
    from cogumi_tasks.core.steps import cache_key, get_step

    task = step_task(tmp_path, "data.generate", OVERRIDES, step_params=PARAMS)
    config = task.hook.get_config()
    inputs = {"shard": "s3://cogumi/production/data.prompts/k/shard-0000.jsonl"}
    argv = pod_argv(task.pod_operator(config, inputs, "manual__2026").build_pod_request_obj(context=None))
    assert argv[0] == "cogumi"
    cli_config, cli_inputs, cli_params = step_call(build_parser().parse_args(argv[1:]))

    assert cli_params == PARAMS and json.dumps(cli_params) == json.dumps(PARAMS)  # 1 != 1.0 != True in JSON
    assert cli_inputs == inputs
    assert cli_config == config and cli_config.llm.budget_usd == 12.5 and cli_config.eval.judge_pairwise is False
    assert cli_config.dataset.generate.system_prompt == "1e3"
    spec, digests = get_step("data.generate"), {"shard": ["sha256:" + "0" * 64]}
    assert cache_key(spec, cli_config, digests, cli_params) == cache_key(spec, config, digests, PARAMS)
    assert cache_key(spec, cli_config, digests, {**cli_params, "flag": "true"}) != cache_key(
        spec, config, digests, PARAMS)


def test_param_flags_are_json(tmp_path):
    from cogumi_tasks.cli import build_parser, step_call
    from cogumi_tasks.core.config import ConfigError

    def params(*flags: str) -> dict:
        return step_call(build_parser().parse_args(["run-step", "data.dedup", *flags]))[2]

    assert params("--param", "n=3", "--param", 'tag="007"', "--param", "on=true") == {"n": 3, "tag": "007", "on": True}
    assert params("--param", "n=3", "--params-json", '{"n": 4.0}') == {"n": 4.0}
    with pytest.raises(ConfigError, match="--param tag=abc: not JSON .*double quotes"):
        params("--param", "tag=abc")
    with pytest.raises(ConfigError, match="--params-json: expected a JSON object, got list"):
        params("--params-json", "[1]")


def test_a_conn_id_key_reaches_the_pod_as_a_kubernetes_secret(tmp_path, airflow_db):
    task = step_task(tmp_path, "data.generate", {
        "teachers.0.conn_id": "openai_prod", "teachers.0.api_key_env": "OPENAI_PROD_KEY",
        "compute.kubernetes.secret_env.cogumi-openai": ["OPENAI_PROD_KEY"]})
    spec = task.pod_operator(task.hook.get_config(), {}, "manual__2026").build_pod_request_obj(context=None)
    env = {e.name: e for e in spec.spec.containers[0].env}
    assert env["OPENAI_PROD_KEY"].value is None
    assert env["OPENAI_PROD_KEY"].value_from.secret_key_ref.name == "cogumi-openai"
    assert env["OPENAI_PROD_KEY"].value_from.secret_key_ref.key == "OPENAI_PROD_KEY"


def test_a_conn_id_no_kubernetes_secret_provides_is_refused_naming_it(tmp_path, airflow_db):
    from cogumi_tasks.core.config import ConfigError

    task = step_task(tmp_path, "data.generate", {
        "teachers.0.conn_id": "openai_prod", "teachers.0.api_key_env": "OPENAI_PROD_KEY",
        "storage.aws_conn_id": "s3_prod", "compute.kubernetes.secret_env.cogumi-s3": ["AWS_ACCESS_KEY_ID"]})
    with pytest.raises(ConfigError) as err:
        task.pod_operator(task.hook.get_config(), {}, "manual__2026")
    message = str(err.value)
    assert "endpoint 'gpt-4o' takes its key from Airflow connection 'openai_prod' (conn_id): list OPENAI_PROD_KEY" \
        in message
    assert "'s3_prod' (aws_conn_id): list AWS_SECRET_ACCESS_KEY" in message
    assert "under compute.kubernetes.secret_env" in message


class _TaskInstance(SimpleNamespace):
    """What the pod operator and ours touch of ``context["ti"]``; XCom pushes are recorded."""

    def xcom_push(self, key: str, value: object) -> None:
        self.xcom[key] = value


def test_a_kubernetes_step_defers_on_its_pod_and_publishes_the_pods_result(tmp_path, airflow_db, monkeypatch):
    """No cluster: the pod as requested stands in for the pod created, and the pod operator's re-entry (which
    reads the pod's logs and result file) is replaced by the result the pod's ``cogumi run-step`` writes."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger
    from airflow.sdk import Asset
    from airflow.sdk.exceptions import TaskDeferred

    created, reentered = [], []
    monkeypatch.setattr(KubernetesPodOperator, "get_or_create_pod",
                        lambda self, pod_request_obj, context: created.append(pod_request_obj) or pod_request_obj)
    inputs = {"model": "s3://cogumi/production/train.vocab_trim/k/model/",
              "dataset": "s3://cogumi/production/data.publish/k/dataset.jsonl"}
    asset = Asset(name="sft_model", uri="cogumi://test/sft")
    task = step_task(tmp_path, "train.sft", inputs=inputs, return_output="model", outlets=[asset])
    ti = _TaskInstance(dag_id="phase1_base", task_id="sft", map_index=-1, try_number=1, xcom={})
    context = {"run_id": "manual__2026", "ti": ti, "dag": None, "outlet_events": {asset: SimpleNamespace()},
               "inlet_events": {}}

    with pytest.raises(TaskDeferred) as raised:
        task.execute(context)
    deferred = raised.value
    assert isinstance(deferred.trigger, KubernetesPodTrigger) and deferred.method_name == "execute_pod_done"
    assert deferred.trigger.pod_name == created[0].metadata.name == ti.xcom["pod_name"]
    assert deferred.kwargs == {"inputs": inputs}
    assert pod_argv(created[0])[:3] == ["cogumi", "run-step", "train.sft"]

    payload = {"manifest": "s3://cogumi/production/train.sft/k/_manifest.json", "skipped": False,
               "model": "s3://cogumi/production/train.sft/k/model/"}
    monkeypatch.setattr(KubernetesPodOperator, "trigger_reentry",
                        lambda self, context, event: reentered.append((self.arguments, event)) or payload)
    event = {"status": "success", "name": deferred.trigger.pod_name, "namespace": "cogumi"}
    assert getattr(task, deferred.method_name)(context, event=event, **deferred.kwargs) == payload["model"]
    assert reentered == [(created[0].spec.containers[0].args, event)]  # the same pod command, rebuilt
    assert {k: ti.xcom[k] for k in payload} == payload
    assert context["outlet_events"][asset].extra == {"manifest": payload["manifest"], "run_id": "manual__2026",
                                                     "outputs": {"model": payload["model"]}}
