"""Agent: one per database host; beacons, heartbeats with load, shard assignments.

The cores here are sans-I/O (:mod:`load`) or tiny and file-bound
(:mod:`incarnation`); :mod:`probe` is the psutil reader. The asyncio shell is
``service.py``.
"""

from services.agent.incarnation import next_incarnation, persist_incarnation
from services.agent.load import LoadDocument, LoadSampler, Readings

__all__ = [
    "LoadDocument",
    "LoadSampler",
    "Readings",
    "next_incarnation",
    "persist_incarnation",
]
