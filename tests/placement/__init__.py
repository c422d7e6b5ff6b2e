"""Placement: profiling, planning and restoring onto another parallel layout."""
