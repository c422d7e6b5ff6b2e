"""The test suite, grouped by layer (see docs/architecture.md, "The tests")."""
