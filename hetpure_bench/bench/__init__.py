"""The benchmark itself: a run's spec and presets, batches attacked and judged, noise streams,
the run orchestration over the result store, sharding, sanity checks, costs and statistics.

``run(spec, store)`` runs one ``RunSpec`` (from ``spec_from_preset``) through a ``ResultStore``.
"""

from .runner import run
from .spec import RunSpec, spec_from_preset
from .store import ResultStore

__all__ = ["ResultStore", "RunSpec", "run", "spec_from_preset"]
