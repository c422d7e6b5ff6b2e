"""Device inventory, cost model and placement planning (a later layer)."""
