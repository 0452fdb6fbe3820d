"""CogumiStepOperator: run one registered cogumi step, wherever the config says it runs.

``compute: local`` and ``gpu_queue`` run the step in the worker process (a ``gpu_queue`` task has
been routed to queue ``gpu`` at parse time, see :func:`cogumi_provider.placement.placement`);
``compute: kubernetes`` builds a KubernetesPodOperator that runs ``cogumi run-step`` in a GPU pod.
Only URIs go through XCom: the return value holds the manifest URI and each output's URI(s), and
each output is also pushed under its own key so ``task.output["shards"]`` can be expanded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator

from cogumi_provider.hooks import CogumiHook


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
        inlet Asset of that name when the input is empty (e.g. Phase 1's ``dataset`` from ``cogumi_phase0``)
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

    def execute(self, context: Any) -> Any:
        payload = CogumiHook(config_name=self.config_name, overrides=self.overrides).run_step(
            self.step, {**self.inputs, **({self.input_name: self.input_uri} if self.input_name else {})},
            self.step_params, context=context, operator=self,
        )
        return payload[self.return_output] if self.return_output else payload
