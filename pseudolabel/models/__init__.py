"""The GPU half of the chain: Grounding DINO boxes and SAM2 masks, batched (Dagster-free)."""
