"""Membership: liveness of every registered node from its heartbeats.

The sans-I/O core lives here (:class:`Membership`, :class:`PhiDetector`,
:class:`MembershipConfig`); the asyncio process that feeds it is
``services.membership.service``.
"""

from .config import MembershipConfig
from .core import (
    ALIVE,
    DEAD,
    EVENT_ALIVE,
    EVENT_DEAD,
    EVENT_LEFT,
    EVENT_LOAD,
    EVENT_SUSPECT,
    LEFT,
    STATES,
    SUSPECT,
    HeartbeatResult,
    Membership,
)
from .detector import MAX_PHI, PhiDetector, tail_phi, tail_phi_inverse

__all__ = [
    "ALIVE",
    "DEAD",
    "EVENT_ALIVE",
    "EVENT_DEAD",
    "EVENT_LEFT",
    "EVENT_LOAD",
    "EVENT_SUSPECT",
    "LEFT",
    "MAX_PHI",
    "STATES",
    "SUSPECT",
    "HeartbeatResult",
    "Membership",
    "MembershipConfig",
    "PhiDetector",
    "tail_phi",
    "tail_phi_inverse",
]
