"""Training scenarios the tests run as real processes (python -m tests.scenarios.NAME, torchrun, launch)."""
