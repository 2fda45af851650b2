"""Sans-I/O plans: what a multi-step call does, written once for every kind of I/O.

A plan is a generator that yields the I/O it needs next (a request, a pause)
and is sent the answer; it returns the call's result or raises its error.
The blocking and the asyncio clients (and the status document's collectors)
each drive the same plan with their own I/O, as h11 leaves the I/O to its
user, so the policy (retries, failover, fallbacks) has one copy.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

Step = TypeVar("Step")


def advance(plan: Generator[Step, Any, Any], got: Any) -> tuple[bool, Any]:
    """Send ``got`` into ``plan`` (None to start it): ``(True, its result)`` when
    it is done, else ``(False, the next step)``; the plan's error propagates."""
    try:
        return False, plan.send(got)
    except StopIteration as done:
        return True, done.value
