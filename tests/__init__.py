"""The test suite. Shared helpers are imported as ``tests.helpers`` (and ``tests.graphgen``, ``tests.bridge_models``):
the repository root is on pytest's ``pythonpath``, the one import root for tests, models/ and tools/."""
