"""The command line, chaos harness, demo, docs and the shape of the code."""
