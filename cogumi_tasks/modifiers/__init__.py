"""Phase 3: domain modifiers, LoRAs trained on what a cascade of teachers solved of the base's failures."""
