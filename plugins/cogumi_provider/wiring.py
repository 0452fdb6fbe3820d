"""A DAG's wiring checked against the steps' declarations when the DAG is parsed.

Every :class:`~cogumi_provider.operators.CogumiStepOperator` (mapped or not) must name a registered step,
pass only input names the step declares, return an output it declares, and read from an upstream step
only outputs that step declares (``upstream.output["x"]``). A misspelt name fails the DAG's import with a
message naming the task, the step and the name, instead of failing a task hours into a run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from airflow.sdk import DAG, XComArg

from cogumi_provider.operators import CogumiStepOperator

# XCom keys every step task pushes besides its outputs (CogumiStepOperator.publish), and Airflow's return value
PAYLOAD_KEYS = ("manifest", "skipped")
RETURN_KEY = "return_value"


class DagWiringError(ValueError):
    """A DAG passes or reads a name its steps do not declare."""


def step_arguments(task: Any) -> dict[str, Any] | None:
    """The CogumiStepOperator arguments of a task (a mapped one's partial and expanded ones); None for any
    other operator."""
    cls = getattr(task, "operator_class", type(task))
    if not (isinstance(cls, type) and issubclass(cls, CogumiStepOperator)):
        return None
    if hasattr(task, "partial_kwargs"):  # a mapped task: .partial(...).expand(...)
        expanded = task.expand_input.value
        return {**task.partial_kwargs, **(expanded if isinstance(expanded, dict) else {})}
    return {k: getattr(task, k, None) for k in ("step", "inputs", "input_name", "input_uri", "return_output",
                                                "asset_inputs")}


def wiring_errors(dag: DAG) -> list[str]:
    """What in ``dag`` does not match the declared inputs and outputs of its steps."""
    from cogumi_tasks.core.steps import get_step

    errors: list[str] = []

    def spec_of(task: Any, args: dict) -> Any:
        try:
            return get_step(args.get("step") or "")
        except KeyError as exc:
            errors.append(f"task {task.task_id}: {exc.args[0]}")
            return None

    for task in dag.tasks:
        args = step_arguments(task)
        if args is None or (spec := spec_of(task, args)) is None:
            continue
        where = f"task {task.task_id} ({spec.name})"
        inputs = args.get("inputs")
        names = {*(inputs if isinstance(inputs, dict) else {}), *(args.get("asset_inputs") or {})}
        if args.get("input_name"):
            names.add(args["input_name"])
        if bad := sorted(names - set(spec.inputs)):
            errors.append(f"{where}: input(s) {bad} are not declared by the step (it declares {list(spec.inputs)})")
        ret = args.get("return_output")
        if ret and ret not in spec.all_outputs:
            errors.append(f"{where}: return_output {ret!r} is not an output of the step "
                          f"(it declares {list(spec.all_outputs)})")
        for upstream, key in XComArg.iter_xcom_references([inputs, args.get("input_uri")]):
            up_args = step_arguments(upstream)
            if up_args is None or key == RETURN_KEY or (up := spec_of(upstream, up_args)) is None:
                continue
            if key not in (*up.all_outputs, *PAYLOAD_KEYS):
                errors.append(f"{where}: {upstream.task_id}.output[{key!r}]: step {up.name} has no output {key!r} "
                              f"(it declares {list(up.all_outputs)}, and {list(PAYLOAD_KEYS)} are pushed too)")
    return sorted(set(errors))


def check_wiring(dag: DAG) -> None:
    """Raise :class:`DagWiringError` listing every mismatch in ``dag``."""
    errors = wiring_errors(dag)
    if errors:
        raise DagWiringError(f"DAG {dag.dag_id}: wiring does not match the steps' declarations:\n  "
                             + "\n  ".join(errors))


def asset_wiring_errors(dags: Iterable[DAG]) -> list[str]:
    """``asset_inputs`` (``"<asset>:<output>"``) that name an output no step publishing that Asset declares."""
    from cogumi_tasks.core.steps import get_step

    tasks = [(t, args) for dag in dags for t in dag.tasks if (args := step_arguments(t)) is not None]
    published: dict[str, set[str]] = {}
    for task, args in tasks:
        for outlet in getattr(task, "outlets", None) or []:
            published.setdefault(getattr(outlet, "name", ""), set()).update(get_step(args["step"]).all_outputs)
    errors = []
    for task, args in tasks:
        for name, ref in (args.get("asset_inputs") or {}).items():
            asset, _, output = ref.removesuffix("?").partition(":")
            if output not in published.get(asset, set()):
                errors.append(f"task {task.dag_id}.{task.task_id}: asset input {name}={ref!r}: no task publishing "
                              f"{asset} has output {output!r} (they have {sorted(published.get(asset, set()))})")
    return errors
