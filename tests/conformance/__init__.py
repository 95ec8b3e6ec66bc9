"""sagaline's own adapters joining the conformance suites of ``sagaline.testing.conformance``."""
