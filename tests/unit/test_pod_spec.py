"""compute: kubernetes builds a real V1Pod (no cluster here: the spec itself is tested)."""

from __future__ import annotations

import json
import shlex

import pytest

KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:6443"}}]
contexts: [{name: c, context: {cluster: c, user: u}}]
current-context: c
users: [{name: u, user: {token: dummy}}]
"""


@pytest.fixture
def pod(tmp_path, airflow_db):
    from cogumi_provider.hooks import CogumiHook

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    hook = CogumiHook(config_name="production",
                      overrides={"compute.kubernetes.config_file": str(kubeconfig), "llm.budget_usd": 50})
    config = hook.get_config()
    op = hook.pod_operator("data.generate", {"shard": "s3://cogumi/production/data.prompts/k/shard-0000.jsonl"},
                           {}, "manual__2026", config, task_id="generate")
    return op.build_pod_request_obj(context=None), config


def test_pod_runs_the_same_step_command(pod):
    spec, _ = pod
    container = spec.spec.containers[0]
    script = container.args[0]
    assert container.command == ["bash", "-c"]
    argv = shlex.split(script.split("&&", 1)[1])
    assert argv[:3] == ["cogumi", "run-step", "data.generate"]
    assert argv[argv.index("--config") + 1] == "production"
    assert argv[argv.index("--output-json") + 1] == "/airflow/xcom/return.json"
    assert "llm.budget_usd=50" in argv
    assert '"shard": "s3://cogumi/production/data.prompts/k/shard-0000.jsonl"' in argv[argv.index("--inputs-json") + 1]


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
    from cogumi_provider.hooks import CogumiHook

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(KUBECONFIG)
    hook = CogumiHook(config_name="production", overrides={"compute.kubernetes.config_file": str(kubeconfig)})
    config = hook.get_config()
    assert config.compute.target("train.sft") == "kubernetes"
    inputs = {"model": "s3://cogumi/production/train.vocab_trim/k/model/",
              "dataset": "s3://cogumi/production/data.publish/k/dataset.jsonl"}
    op = hook.pod_operator("train.sft", inputs, {}, "asset_triggered__2026", config, task_id="sft")
    spec = op.build_pod_request_obj(context=None)
    container = spec.spec.containers[0]
    argv = shlex.split(container.args[0].split("&&", 1)[1])
    assert argv[:3] == ["cogumi", "run-step", "train.sft"]
    assert json.loads(argv[argv.index("--inputs-json") + 1]) == inputs
    assert argv[argv.index("--run-id") + 1] == "asset_triggered__2026"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert spec.metadata.labels["cogumi-step"] == "train-sft"
