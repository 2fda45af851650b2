"""Every tunable of the membership service, with its unit and the reason for its default.

The figures quoted come from ``bench/failure_detection.py --parts s``
(virtual-time simulation of the core; results in
``bench/results/failure_detection.json``); its other parts give the
real-process figures (SIGKILL of an agent, saturated cores).

With the defaults and a steady node the detector's window has a spread below
``min_std_dev``, so the thresholds translate into fixed silences:

    suspect after  0.25 + 0.5 + 3.09 * 0.1  = 1.06 s without a heartbeat (phi 3)
    dead    after  0.25 + 0.5 + 5.61 * 0.1  = 1.31 s without a heartbeat (phi 8)

A SIGKILL happens on average half an interval after the last heartbeat and the
core is ticked every 0.1 s, so detection takes 1.06 - 1.41 s after the kill:
inside the 2 s goal with ~0.6 s to spare for the real shell's scheduling.

Simulated at these defaults (600 kills each):

    typical jitter                         median 1.24 s, max 1.40 s
    heavy jitter + GC stalls of membership median 1.26 s, max 1.89 s
      (an observer stall adds its own length to a detection it overlaps)

and no false suspicion or conviction over 100 nodes x 600 s of heavy jitter
(agents' heartbeats up to 0.3 s late, agent pauses up to 0.5 s) with 83 stalls
of membership itself, two of them 3 s SIGSTOPs. Without the stall protection
the same run convicts all 100 nodes when the late tick runs before the backlog
is drained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from services.membership.settings import DEFAULTS


@dataclass(frozen=True, slots=True)
class MembershipConfig:
    """Settings of the failure detector and the membership list; see the module docstring."""

    heartbeat_interval: float = DEFAULTS["heartbeat_interval"]
    """Seconds between an agent's heartbeats, as the detector expects them. 250 ms
    is the issue's default and what the 2 s detection goal needs: the dead
    silence below is ~5 intervals, so one late or lost heartbeat is tolerated.
    Also seeds the window of a node that has sent no gap yet."""

    window_size: int = DEFAULTS["phi_window"]
    """Inter-arrival samples kept per node (count). 200 gaps = 50 s at 4 Hz: long
    enough that one late heartbeat moves sigma little, short enough that a node
    whose network got worse is judged by its new behaviour within a minute.
    Memory: ~8 bytes per sample, 16 MB for 10,000 nodes."""

    min_std_dev: float = DEFAULTS["phi_min_std_dev"]
    """Floor on sigma (seconds). Local heartbeats have sigma of a few ms, which
    would make phi explode at the first 20 ms delay; with the floor the silence
    to conviction is mean + acceptable_pause + 0.56 s. Simulated sweep (with the
    default pause): 0.05 s detects by 1.12 s at worst but convicts three times
    as many live nodes as 0.1 s when agents pause up to 1 s (12 vs 4 over
    100 nodes x 300 s); 0.2 s is nearly immune to those but its worst detection
    (1.94 s) leaves no room within 2 s. 0.1 s: worst 1.39 s."""

    acceptable_pause: float = DEFAULTS["acceptable_pause"]
    """Seconds of silence beyond the mean gap that are not evidence at all (added
    to the mean). Two intervals: covers an agent's GC or CPU-starved scheduler
    delaying a heartbeat by up to ~0.5 s, the pauses the heavy-jitter simulation
    injects, with no false suspicion. Sweep: 0.25 s gives false suspicions under
    heavy jitter (with a 0.05 s floor) and 5x more under 1 s agent pauses;
    1.0 s pushes the worst detection to 1.89 s."""

    suspect_phi: float = DEFAULTS["phi_suspect"]
    """Phi at which an alive node becomes suspect (dimensionless; 3 = a gap this
    long happens about once in 1,000). Suspect is a warning: the node is told
    in its next ack and the balancer may prefer other replicas, nothing moves."""

    dead_phi: float = DEFAULTS["phi_dead"]
    """Phi at which a suspect node is declared dead (8 = once in 10^8 gaps, the
    conventional accrual threshold). Reached at 1.31 s of silence for a steady
    node, 0.25 s (one heartbeat) after suspicion."""

    suspicion_timeout: float = DEFAULTS["suspicion_timeout"]
    """Seconds a node may stay suspect, silent, before it is dead whatever phi
    says. Phi alone would wait very long for a node whose window holds a wide
    spread; this caps detection at (suspect silence + 1 s). Four intervals:
    time for a suspected node to refute several times over."""

    incarnation_lead: float = DEFAULTS["incarnation_lead"]
    """Seconds an incarnation may run ahead of membership's wall clock, or of the
    incarnation it holds for the node if that is higher (agents number incarnations
    in milliseconds of their own clock, so this is compared as milliseconds). A
    heartbeat further ahead is refused with ``incarnation_ahead`` and counted: one
    forged heartbeat must not be able to push a node to an incarnation its agent
    can never pass (the int64 ceiling), nor far enough that its agent has to climb.
    An hour covers any sane clock skew between hosts; a host whose clock runs more
    than an hour fast is refused until its clock is fixed, and says why in its log.
    Without a wall clock (``wall_ms`` not given) the bound is relative to the held
    incarnation only."""

    first_heartbeat_timeout: float = 10.0
    """Seconds an admitted node may stay silent before its *first* heartbeat (in
    this membership process's life) before it is declared dead. Without it a
    node that died while membership was restarting, or before its first
    heartbeat reached it, never gets a verdict at all: it stays "pending", and
    nobody fails its primaries over (found by the simulator, phantom_sim). Forty
    default intervals: an agent's DEALER reconnects within a fraction of a
    second of membership coming back, so only a node that is really gone waits
    this long; a stall of membership itself is discounted as for any silence."""

    tick_interval: float = 0.1
    """Seconds between the shell's calls to ``tick``. Detection granularity: 0.1 s
    is 5 % of the 2 s budget. Deadlines sit in a heap, so a tick costs what the
    arrivals since the last one cost to fold in (2.5 ms for 10,000 nodes at
    1 Hz) and not a phi evaluation per node (7 ms more)."""

    stall_threshold: float = 0.05
    """Seconds of observer loop lag (how late the tick timer fired) from which
    the lag is treated as a stall of membership itself and discounted from
    every node's silence. Smaller lags are ordinary scheduling noise, absorbed
    ten times over by ``acceptable_pause``; discounting them would slow
    detection under load for no gain."""

    backlog_grace: float = 1.0
    """Upper bound (seconds) on the time after an observer stall during which
    nobody is convicted and no inter-arrival gap is learned from, because
    heartbeats queued during the stall are still being drained in a burst. The
    grace actually applied is min(backlog_grace, stall length): the backlog is
    proportional to the stall and drains at least as fast as it built up while
    membership is under half busy. Sizing: a 3 s stall with 10,000 nodes at 1 Hz
    queues 30,000 heartbeats; at ~3 us each in the core (bench, section 4) plus
    ~20 us of decoding in the shell that is ~0.7 s."""

    load_digest_interval: float = 1.0
    """Seconds between ``member.load`` digests the shell publishes. Loads change on
    every heartbeat; an event per heartbeat would be 40,000 events/s at 10,000
    nodes. Once a second is fresher than psutil's own sampling is useful."""

    max_load_age: float = 5.0
    """Seconds after which a node's latest load document is reported stale
    (``load_stale``): 20 heartbeats at the default interval. A consumer should
    not weigh a replica by a load that old."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting whose value is unusable."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "window_size":
                if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                    raise ValueError(
                        f"membership setting window_size must be an integer >= 2, got {value!r}"
                    )
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(
                    f"membership setting {f.name} must be a finite number, got {value!r}"
                )
        positive = (
            "heartbeat_interval",
            "min_std_dev",
            "suspicion_timeout",
            "incarnation_lead",
            "first_heartbeat_timeout",
            "tick_interval",
            "load_digest_interval",
            "max_load_age",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"membership setting {name} must be > 0 seconds, got {getattr(self, name)!r}"
                )
        for name in ("acceptable_pause", "stall_threshold", "backlog_grace"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"membership setting {name} must be >= 0 seconds, got {getattr(self, name)!r}"
                )
        if not 0 < self.suspect_phi <= 100:
            raise ValueError(
                f"membership setting suspect_phi must be within (0, 100], got {self.suspect_phi!r}"
            )
        if not self.suspect_phi < self.dead_phi <= 100:
            raise ValueError(
                "membership setting dead_phi must be greater than suspect_phi "
                f"({self.suspect_phi!r}) and at most 100, got {self.dead_phi!r}"
            )
