"""Format and storage: the zarr layout, back ends, integrity, fencing, untrusted input."""
