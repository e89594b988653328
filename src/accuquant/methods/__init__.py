"""Calibration methods: ``naive``, ``per-step`` and ``accuquant``.

Each is a module with its config dataclass and a :class:`~accuquant.engine.Method` that
registers itself (:mod:`accuquant.methods.base`); the engine runs them all. The package
imports none of them: :mod:`accuquant.api` does, so the registry is complete wherever
the package is imported.
"""
