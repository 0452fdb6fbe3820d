"""CogumiStepOperator: run one registered cogumi step, wherever the run's config places it.

``compute: local`` and ``gpu_queue`` run the step in the worker process (a ``gpu_queue`` task has
been routed to queue ``gpu`` at parse time, see :func:`cogumi_provider.placement.placement`). A step
that waits on a Batch API batch does not hold the worker meanwhile: the operator defers to a
:class:`~cogumi_provider.triggers.BatchTrigger` and, once the batch is done, runs the step again, which
finds its stored batch and submits nothing new. ``compute: kubernetes`` starts a GPU pod that runs
``cogumi run-step`` and defers to the KubernetesPodOperator's trigger until the pod ends.

The operator owns XCom, the outlet Asset events and the inputs taken from inlet Asset events;
:class:`~cogumi_provider.hooks.CogumiHook` is the client that runs the step or writes its command.
Only URIs go through XCom: the return value holds the manifest URI and each output's URI(s), and
each output is also pushed under its own key so ``task.output["shards"]`` can be expanded.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from datetime import timedelta
from functools import cached_property
from typing import Any, NoReturn

from airflow.sdk import BaseOperator

from cogumi_provider.hooks import CogumiHook
from cogumi_tasks.core.config import PipelineConfig

XCOM_RETURN = "/airflow/xcom/return.json"


class CogumiStepOperator(BaseOperator):
    """Run the cogumi step ``step`` with the run's config and the given input URIs.

    :param step: registered step name, e.g. ``data.dedup`` (``cogumi steps`` lists them)
    :param config_name: config in configs/ (templated; the DAG passes ``{{ params.config }}``)
    :param overrides: dotted config keys -> values (templated; None or "" leaves a value alone)
    :param inputs: input name -> URI or list of URIs (templated; XComArgs allowed)
    :param step_params: extra step parameters that enter the cache key
    :param input_name: name of one more input whose URI comes in ``input_uri``; dynamic task mapping
        expands ``input_uri`` over a list of URIs (e.g. ``.expand(input_uri=prompts.output["shards"])``)
    :param input_uri: the URI for ``input_name``
    :param asset_inputs: input name -> ``"<asset>:<output>"``, taken from the newest event of the task's
        inlet Asset of that name when the input is empty (e.g. Phase 1's ``dataset`` from ``cogumi_phase0``);
        a trailing ``?`` makes it optional (left out when no event has it)
    :param return_output: the output whose URI(s) become the return value, so a downstream task can
        be mapped over it (Airflow maps only over return values); every output and the manifest are
        also pushed under their own XCom keys
    """

    template_fields: Sequence[str] = ("config_name", "overrides", "inputs", "step_params", "input_uri")
    template_fields_renderers = {"overrides": "json", "inputs": "json", "step_params": "json"}
    ui_color = "#f4e1c1"

    def __init__(
        self,
        *,
        step: str,
        config_name: str = "{{ params.config }}",
        overrides: dict[str, Any] | None = None,
        inputs: dict[str, Any] | None = None,
        step_params: dict[str, Any] | None = None,
        input_name: str | None = None,
        input_uri: str | None = None,
        return_output: str | None = None,
        asset_inputs: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.step = step
        self.config_name = config_name
        self.overrides = overrides or {}
        self.inputs = inputs or {}
        self.step_params = step_params or {}
        self.input_name = input_name
        self.input_uri = input_uri
        self.return_output = return_output
        self.asset_inputs = asset_inputs or {}

    @cached_property
    def hook(self) -> CogumiHook:
        return CogumiHook(config_name=self.config_name, overrides=self.overrides)

    def execute(self, context: Any) -> Any:
        config = self.hook.get_config()
        if self.target(config) == "kubernetes":
            self.start_pod(context, config, self.step_inputs(context))
        return self.run_here(context, config)

    def execute_batch_done(self, context: Any, event: dict[str, Any]) -> Any:
        """Resumed by the BatchTrigger: run the step again; it reads the finished batch (or defers on the next)."""
        if event["status"] == "error":
            raise RuntimeError(event["message"])
        return self.run_here(context, self.hook.get_config())

    def execute_pod_done(self, context: Any, event: dict[str, Any], inputs: dict[str, Any]) -> Any:
        """Resumed by the pod's trigger: the pod operator reads the pod's logs and result and cleans up."""
        pod = self.pod_operator(self.hook.get_config(), inputs, context["run_id"])
        return self.publish(context, self._pod_call(lambda: pod.trigger_reentry(context, event), inputs))

    # ------------------------------------------------------------ placement
    def target(self, config: PipelineConfig) -> str:
        """Where the run's config places the step; a ``gpu_queue`` step must have been parsed onto that queue."""
        target = config.compute.target(self.step)
        if target == "gpu_queue" and self.queue != config.compute.gpu_queue:
            raise RuntimeError(
                f"{self.step}: config {config.name} places it on queue {config.compute.gpu_queue!r}, but this task "
                f"was parsed onto queue {self.queue!r}; deploy with COGUMI_CONFIG={self.config_name}"
            )
        return target

    def run_here(self, context: Any, config: PipelineConfig) -> Any:
        """Run the step in this process; a batch it waits on defers the task instead of holding the worker."""
        from cogumi_provider.triggers import BatchTrigger
        from cogumi_tasks.core.config import EndpointConfig
        from cogumi_tasks.llm.batch import BatchPending, deferring

        try:
            with deferring():
                payload = self.hook.run_step(self.step, config, self.step_inputs(context), self.step_params,
                                             run_id=context["run_id"])
        except BatchPending as pending:
            self.log.info("%s; deferring until it is done", pending)
            self.defer(
                trigger=BatchTrigger(endpoint=pending.endpoint.model_dump(mode="json", include=set(
                                         EndpointConfig.model_fields)),  # a teacher's weight is not the trigger's
                                     batch_id=pending.batch_id, state_uri=pending.state_uri,
                                     poll_s=config.llm.batch_poll_s),
                method_name="execute_batch_done", timeout=timedelta(seconds=config.llm.batch_timeout_s))
        return self.publish(context, payload)

    def start_pod(self, context: Any, config: PipelineConfig, inputs: dict[str, Any]) -> NoReturn:
        """Create the step's pod and defer until it ends."""
        pod = self.pod_operator(config, inputs, context["run_id"])
        self._pod_call(lambda: pod.execute_async(context), inputs)
        # The pod operator reads a pod that had already ended without deferring, and keeps no result.
        raise RuntimeError(f"{self.step}: pod {pod.name} had ended before this task could wait on it, so its "
                           "outputs were not read; retry the task (the step's published result is reused)")

    def _pod_call(self, call: Callable[[], Any], inputs: dict[str, Any]) -> Any:
        """``call()``, with the pod operator's deferral turned into this task's (resumed in execute_pod_done)."""
        from airflow.sdk.exceptions import TaskDeferred

        try:
            return call()
        except TaskDeferred as deferred:
            self.defer(trigger=deferred.trigger, method_name="execute_pod_done",
                       kwargs={**(deferred.kwargs or {}), "inputs": inputs}, timeout=deferred.timeout)

    def pod_operator(self, config: PipelineConfig, inputs: dict[str, Any], run_id: str) -> Any:
        """A deferrable KubernetesPodOperator for the step: GPU limits, node selector, tolerations, secrets as
        env (see :meth:`CogumiHook.pod_secrets`), and the same ``cogumi run-step`` command and values."""
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        kube = config.compute.kubernetes
        resources = k8s.V1ResourceRequirements(
            requests={"cpu": kube.cpu, "memory": kube.memory},
            limits={"memory": kube.memory, **({"nvidia.com/gpu": str(kube.gpus)} if kube.gpus else {})},
        )
        env = {"COGUMI_CONFIG_DIR": "/opt/cogumi/configs"}
        if config.storage.endpoint_url:
            env["COGUMI_S3_ENDPOINT"] = config.storage.endpoint_url
        cmd = self.hook.command(self.step, inputs, self.step_params, run_id, output_json=XCOM_RETURN)
        slug = self.step.replace(".", "-").replace("_", "-")
        return KubernetesPodOperator(
            task_id=f"{self.task_id}__pod",
            name=f"cogumi-{slug}",
            namespace=kube.namespace,
            image=kube.image,
            cmds=["bash", "-c"],
            arguments=[f"mkdir -p /airflow/xcom && {shlex.join(cmd)}"],
            env_vars=env,
            secrets=self.hook.pod_secrets(config),
            container_resources=resources,
            node_selector=dict(kube.node_selector),
            tolerations=[k8s.V1Toleration(**t) for t in kube.tolerations],
            service_account_name=kube.service_account,
            config_file=kube.config_file,
            in_cluster=kube.in_cluster if not kube.config_file else False,
            startup_timeout_seconds=kube.startup_timeout_s,
            labels={"app": "cogumi", "cogumi-step": slug},
            do_xcom_push=True,
            get_logs=True,
            on_finish_action="delete_succeeded_pod",
            execution_timeout=self.execution_timeout,
            deferrable=True,
        )

    # ------------------------------------------------------------ inputs and outputs
    def step_inputs(self, context: Any) -> dict[str, str | list[str]]:
        """The rendered inputs as plain URIs (a mapped task's lazy XCom sequences become lists), plus
        ``input_name``'s URI and, for an empty input, its value from an inlet Asset event."""
        raw = {**self.inputs, **({self.input_name: self.input_uri} if self.input_name else {})}
        inputs = {name: value if isinstance(value, str) else [str(v) for v in value]
                  for name, value in raw.items() if value is not None}
        for name, ref in self.asset_inputs.items():
            if not inputs.get(name):
                value = self.asset_output(context, ref)
                if value is not None:
                    inputs[name] = value
                else:
                    inputs.pop(name, None)
        return inputs

    def asset_output(self, context: Any, ref: str) -> str | list[str]:
        """``"<asset name>:<output>"``: that output of the newest event of the task's inlet Asset of that name
        (what an earlier phase published). ``"<asset>:<output>?"`` is optional: None when the Asset has no event
        or its newest event lacks that output (e.g. Phase 2 ran without a recovery LoRA)."""
        optional = ref.endswith("?")
        asset_name, _, output = ref.removesuffix("?").partition(":")
        inlet = next((a for a in self.inlets or [] if getattr(a, "name", None) == asset_name), None)
        if inlet is None or not output:
            raise ValueError(f"{self.task_id}: asset input {ref!r} needs the form '<asset>:<output>' and an inlet "
                             f"Asset of that name on the task")
        events = list(context["inlet_events"][inlet])
        if optional and (not events or output not in (events[-1].extra or {}).get("outputs", {})):
            return None
        if not events:
            raise ValueError(f"{self.task_id}: Asset {asset_name} has no event yet: run the DAG that publishes it "
                             "first, or pass the input as a param")
        outputs = (events[-1].extra or {}).get("outputs", {})
        if output not in outputs:
            raise ValueError(f"{self.task_id}: the newest {asset_name} event has no output {output!r} "
                             f"(has {sorted(outputs)})")
        return outputs[output]

    def publish(self, context: Any, payload: dict[str, Any]) -> Any:
        """Push the manifest, ``skipped`` and every output under its own XCom key, set the outlet Asset events'
        extra (what a later phase's asset inputs read), and return ``return_output``'s URI(s) or the payload."""
        for key, value in payload.items():
            context["ti"].xcom_push(key=key, value=value)
        for outlet in self.outlets or []:
            context["outlet_events"][outlet].extra = {
                "manifest": payload["manifest"], "run_id": context["run_id"],
                "outputs": {k: v for k, v in payload.items() if k not in ("manifest", "skipped")},
            }
        return payload[self.return_output] if self.return_output else payload
