"""Phase 4: routing between the base and the modifiers, escalation detection and session memory."""
