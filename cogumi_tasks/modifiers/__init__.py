"""Phase 3: domain modifiers, LoRAs trained on what a cascade of teachers solved of the base's failures."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cogumi_tasks.core.steps import StepContext, StepFailed

if TYPE_CHECKING:
    from cogumi_tasks.core.config import ModifierConfig


def step_modifier(ctx: StepContext) -> ModifierConfig:
    """The modifier a per-modifier step runs for (its ``modifier`` param), or a StepFailed naming the known ones."""
    name = ctx.params.get("modifier")
    try:
        return ctx.config.modifier(str(name))
    except KeyError as exc:
        raise StepFailed(f"{ctx.spec.name}: params.modifier: {exc.args[0]}") from None
