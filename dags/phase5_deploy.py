"""Phase 5: release the routed system, validate it served on loopback, and make it current only if it passed.

release -> validate -> promote
  release:  Phase 3's base, recovery and modifier LoRAs with Phase 4's router, escalation detector and calibrator,
            one release directory with a model card of measured figures
  validate: the release served by the engine and gateway on a free 127.0.0.1 port; the held-out items through
            cogumi-auto against the reference, the gates per domain, tokens/s, the feedback tally
  promote:  the release copied to the registry (releases/<id>/) and releases/current.json pointed at it, only when
            validation passed (otherwise the pointer stays and the task fails naming the gate)
Scheduled on Phase 4's Asset; ``cogumi serve --release current`` serves what the pointer names.
"""

from __future__ import annotations

from airflow.sdk import Param
from cogumi_provider.operators import CogumiStepOperator
from cogumi_provider.placement import cogumi_dag, phase_asset, placement, run_params

with cogumi_dag(
    "phase5_deploy",
    "Release: bundle base, modifiers, router and escalation detector; validate it served; promote it if it passed",
    params=run_params(
        routing=Param(None, type=["null", "string"], title="Routing bundle",
                      description="s3:// URI of routing.publish's bundle.json; empty: the newest cogumi_phase4 one."),
        modifiers=Param(None, type=["null", "string"], title="Modifiers bundle",
                        description="s3:// URI of modifiers.publish's bundle.json; empty: the newest cogumi_phase3 "
                                    "one."),
        reference_items=Param(None, type=["null", "string"], title="Reference answers",
                    description="s3:// URI of modifiers.evaluate's items (the reference's score per held-out item); "
                                "empty: the newest cogumi_phase3 one."),
    ),
    overrides={"llm.budget_usd": "{{ params.budget_usd }}"},
    tags=["phase5"],
    schedule=[phase_asset("phase4")],
) as dag:
    release = CogumiStepOperator(
        task_id="release", step="serve.release",
        inputs={"routing": "{{ params.routing }}", "modifiers": "{{ params.modifiers }}"},
        inlets=[phase_asset("phase4"), phase_asset("phase3")],
        asset_inputs={"routing": "cogumi_phase4:bundle", "modifiers": "cogumi_phase3:bundle"},
        **placement("serve.release"))
    validate = CogumiStepOperator(
        task_id="validate", step="serve.validate",
        inputs={"release": release.output["release"], "items": "{{ params.reference_items }}"},
        inlets=[phase_asset("phase3")], asset_inputs={"items": "cogumi_phase3:items"},
        **placement("serve.validate"))
    promote = CogumiStepOperator(
        task_id="promote", step="serve.promote",
        inputs={"release": release.output["release"], "validation": validate.output["validation"]},
        outlets=[phase_asset("phase5")], **placement("serve.promote"))
