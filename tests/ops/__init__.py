"""Op capture and op-level replay of a diverging step."""
