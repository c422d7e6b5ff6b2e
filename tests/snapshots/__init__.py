"""Snapshots: capture, save and save_async, commit, restore into live objects."""
