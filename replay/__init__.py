"""The op-stream log and deterministic replay (a later layer)."""
