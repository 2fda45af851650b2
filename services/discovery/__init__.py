"""Discovery: the table of database nodes seen by their beacons (core and schema).

The asyncio shell (``service.py``) feeds :class:`DiscoveryTable` with the
payloads from its SUB socket and publishes the events it returns.
"""

from services.discovery.beacon import (
    BEACON_VERSION,
    DEFAULT_ZONE,
    MAX_BEACON_BYTES,
    Beacon,
    decode_beacon,
    encode_beacon,
    new_instance_id,
    parse_beacon,
)
from services.discovery.core import DiscoveryConfig, DiscoveryTable

__all__ = [
    "BEACON_VERSION",
    "DEFAULT_ZONE",
    "MAX_BEACON_BYTES",
    "Beacon",
    "DiscoveryConfig",
    "DiscoveryTable",
    "decode_beacon",
    "encode_beacon",
    "new_instance_id",
    "parse_beacon",
]
