"""Virtual-time simulator for the membership core.

N agents heartbeat on a fixed schedule with seeded random delays (scheduler
jitter, rare spikes, stop-the-world pauses, loss); some are killed at given
times; the observer (the membership process) itself stalls now and then. The
simulator replays all of it through a :class:`Membership` core in virtual time
and reports how long each kill took to detect and which live nodes were
wrongly suspected or declared dead.

The observer is modelled as the real shell behaves: it handles one message at
a time (``message_cost`` seconds each), so during a stall heartbeats queue up
and are drained in a burst when it resumes; its tick timer is re-armed
``tick_interval`` after each tick and fires late when the loop was busy or
stalled, and that lateness is passed to ``tick`` as the observer lag.

Nothing here reads a clock: the same seed gives the same report.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from dataclasses import dataclass, field

from phantom_bus.events import Event

from .config import MembershipConfig
from .core import EVENT_DEAD, EVENT_SUSPECT, Membership


@dataclass(frozen=True, slots=True)
class Jitter:
    """How late an agent's heartbeats arrive relative to their schedule (seconds)."""

    network: float = 0.0002
    """Constant one-way delay."""
    scheduling: float = 0.002
    """Mean of an exponential delay before each send (the agent's loop being busy)."""
    spike_probability: float = 0.0
    """Chance that a heartbeat is additionally delayed by a spike."""
    spike_max: float = 0.0
    """Spikes are uniform in ``[0, spike_max]``."""
    pause_rate: float = 0.0
    """Stop-the-world pauses of the agent per second (GC, CPU starvation)."""
    pause_max: float = 0.0
    """Pauses are uniform in ``[0, pause_max]``; sends due during one go out once at its end."""
    loss: float = 0.0
    """Chance that a heartbeat is lost (sequence number still advances)."""

    @classmethod
    def quiet(cls) -> Jitter:
        """An idle host: sub-millisecond scheduling noise."""
        return cls(scheduling=0.0005)

    @classmethod
    def typical(cls) -> Jitter:
        """A busy host: a few ms of scheduling delay, 1 % of heartbeats up to 50 ms late."""
        return cls(scheduling=0.003, spike_probability=0.01, spike_max=0.05)

    @classmethod
    def heavy(cls) -> Jitter:
        """Both cores saturated: 10 ms mean delay, 2 % spikes up to 300 ms, and a
        stop-the-world pause of up to 500 ms per agent about once a minute."""
        return cls(
            scheduling=0.01,
            spike_probability=0.02,
            spike_max=0.3,
            pause_rate=1 / 60,
            pause_max=0.5,
            loss=0.0005,
        )


@dataclass(frozen=True, slots=True)
class Observer:
    """How the membership process itself misbehaves."""

    pauses: tuple[tuple[float, float], ...] = ()
    """Explicit stalls as ``(start, length)`` in seconds from the start (a SIGSTOP)."""
    gc_rate: float = 0.0
    """Random stalls per second (GC, CPU starvation)."""
    gc_max: float = 0.0
    """Random stalls are uniform in ``[0.02, gc_max]`` seconds."""
    message_cost: float = 20e-6
    """Seconds the observer spends on one heartbeat (decode + core)."""
    drain_before_tick: bool = True
    """On resuming, drain queued heartbeats before the late tick runs (True) or
    run the tick first and drain afterwards (False). Both orders must be safe."""

    @classmethod
    def gc_heavy(cls) -> Observer:
        """A stall of 20 ms - 300 ms every 5 s on average, as a loaded CPython heap does."""
        return cls(gc_rate=0.2, gc_max=0.3)


@dataclass(frozen=True, slots=True)
class Scenario:
    """One simulated run."""

    nodes: int = 10
    duration: float = 30.0
    interval: float = 0.25
    jitter: Jitter = field(default_factory=Jitter)
    observer: Observer = field(default_factory=Observer)
    kills: tuple[tuple[int, float], ...] = ()
    """``(node index, time from start)``: the agent stops sending at that time."""
    seed: int = 0
    config: MembershipConfig | None = None
    """Core settings; ``None`` means defaults with ``heartbeat_interval = interval``."""
    start: float = 1000.0
    """Virtual time of the start; not zero, to catch code that assumes it."""
    load: bool = True
    """Send a small load document with each heartbeat."""


@dataclass(slots=True)
class SimReport:
    """What a run showed. Times are seconds; event times are offsets from the start."""

    detection: dict[str, float]
    """Killed node -> seconds from kill to ``member.dead``."""
    suspicion: dict[str, float]
    """Killed node -> seconds from kill to ``member.suspect``."""
    undetected: list[str]
    """Killed nodes not dead by the end of the run."""
    false_suspects: list[tuple[float, str]]
    """``member.suspect`` of a node that was alive (not yet killed)."""
    false_deads: list[tuple[float, str]]
    """``member.dead`` of a node that was alive (not yet killed)."""
    events: list[tuple[float, Event]]
    heartbeats: int
    ticks: int
    stalls: int
    stalled_seconds: float
    core: Membership


def node_name(index: int) -> str:
    """The id the simulator gives node ``index``."""
    return f"node-{index:05d}"


def _arrivals(sc: Scenario, rng: random.Random) -> list[tuple[float, int, int]]:
    """Every heartbeat arrival as ``(time offset, node index, seq)``, time-ordered."""
    jit = sc.jitter
    kills = dict(sc.kills)
    out: list[tuple[float, int, int]] = []
    for i in range(sc.nodes):
        end = min(sc.duration, kills.get(i, math.inf))
        pauses: list[tuple[float, float]] = []
        if jit.pause_rate > 0 and jit.pause_max > 0:
            t = rng.expovariate(jit.pause_rate)
            while t < sc.duration:
                length = rng.uniform(0.0, jit.pause_max)
                pauses.append((t, t + length))
                t += length + rng.expovariate(jit.pause_rate)
        p = 0
        t = rng.uniform(0.0, sc.interval)
        seq = 0
        last_send = -math.inf
        last_arrival = -math.inf
        while t < end:
            send = t
            while p < len(pauses) and pauses[p][1] <= send:
                p += 1
            if p < len(pauses) and pauses[p][0] <= send:
                send = pauses[p][1]
            if jit.scheduling > 0:
                send += rng.expovariate(1.0 / jit.scheduling)
            if jit.spike_probability > 0 and rng.random() < jit.spike_probability:
                send += rng.uniform(0.0, jit.spike_max)
            t += sc.interval
            # Sends postponed to the same moment (end of a pause) collapse into
            # one: a late timer fires once, it does not replay what it missed.
            if send <= last_send or send >= end:
                continue
            last_send = send
            seq += 1
            if jit.loss > 0 and rng.random() < jit.loss:
                continue
            # One TCP connection per agent: arrivals keep their order.
            arrival = max(send + jit.network, last_arrival)
            last_arrival = arrival
            out.append((arrival, i, seq))
    out.sort()
    return out


def _stalls(sc: Scenario, rng: random.Random) -> list[tuple[float, float]]:
    obs = sc.observer
    spans = [(s, s + length) for s, length in obs.pauses]
    if obs.gc_rate > 0 and obs.gc_max > 0:
        t = rng.expovariate(obs.gc_rate)
        while t < sc.duration:
            length = rng.uniform(min(0.02, obs.gc_max), obs.gc_max)
            spans.append((t, t + length))
            t += length + rng.expovariate(obs.gc_rate)
    spans.sort()
    merged: list[tuple[float, float]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    return merged


def run(sc: Scenario) -> SimReport:
    """Replay ``sc`` through a fresh core and report detections and false positives."""
    rng = random.Random(sc.seed)
    cfg = sc.config if sc.config is not None else MembershipConfig(heartbeat_interval=sc.interval)
    core = Membership(cfg)
    t0 = sc.start
    for i in range(sc.nodes):
        core.admit(node_name(i), t0)
    names = [node_name(i) for i in range(sc.nodes)]
    loads = [{"cpu": float(i % 100), "mem": 40.0} if sc.load else None for i in range(sc.nodes)]
    arrivals = _arrivals(sc, rng)
    stalls = _stalls(sc, rng)
    stall_starts = [s for s, _ in stalls]

    def resume(t: float) -> float:
        k = bisect_right(stall_starts, t) - 1
        if k >= 0 and t < stalls[k][1]:
            return stalls[k][1]
        return t

    events: list[tuple[float, Event]] = []
    cost = sc.observer.message_cost
    drain_first = sc.observer.drain_before_tick
    free_at = 0.0
    next_tick = cfg.tick_interval
    n = len(arrivals)
    k = 0
    heartbeats = ticks = 0
    while True:
        pa = resume(max(arrivals[k][0], free_at)) if k < n else math.inf
        pt = resume(max(next_tick, free_at))
        if pa > sc.duration and pt > sc.duration:
            break
        if pa < pt or (pa == pt and drain_first):
            _, i, seq = arrivals[k]
            k += 1
            res = core.heartbeat(names[i], 1, seq, loads[i], t0 + pa)
            heartbeats += 1
            events.extend((pa, e) for e in res.events)
            free_at = pa + cost
        else:
            lag = pt - next_tick
            for e in core.tick(t0 + pt, lag):
                events.append((pt, e))
            ticks += 1
            free_at = pt
            next_tick = pt + cfg.tick_interval

    kill_at = {node_name(i): t for i, t in sc.kills}
    detection: dict[str, float] = {}
    suspicion: dict[str, float] = {}
    false_suspects: list[tuple[float, str]] = []
    false_deads: list[tuple[float, str]] = []
    for t, e in events:
        node = e.data["node"]
        killed = kill_at.get(node, math.inf)
        if e.kind == EVENT_SUSPECT:
            if t < killed:
                false_suspects.append((t, node))
            elif node not in suspicion:
                suspicion[node] = t - killed
        elif e.kind == EVENT_DEAD:
            if t < killed:
                false_deads.append((t, node))
            elif node not in detection:
                detection[node] = t - killed
    stats = core.stats()
    return SimReport(
        detection=detection,
        suspicion=suspicion,
        undetected=sorted(n for n in kill_at if n not in detection),
        false_suspects=false_suspects,
        false_deads=false_deads,
        events=events,
        heartbeats=heartbeats,
        ticks=ticks,
        stalls=int(stats["stalls"]),
        stalled_seconds=float(stats["stalled_seconds"]),
        core=core,
    )


def detection_trials(
    trials: int,
    *,
    nodes: int = 20,
    kills_per_trial: int = 3,
    warmup: float = 30.0,
    interval: float = 0.25,
    jitter: Jitter | None = None,
    observer: Observer | None = None,
    config: MembershipConfig | None = None,
    seed: int = 0,
) -> tuple[list[float], int, int]:
    """Kill ``kills_per_trial`` random nodes at random moments after ``warmup``
    seconds of history, ``trials`` times with seeds ``seed, seed+1, ...``.

    Returns every detection time, the number of kills never detected, and the
    number of false positives (suspect or dead events of live nodes).
    """
    times: list[float] = []
    undetected = 0
    false_positives = 0
    for trial in range(trials):
        rng = random.Random(seed + trial)
        victims = rng.sample(range(nodes), kills_per_trial)
        kills = tuple((v, warmup + rng.uniform(0.0, 5.0)) for v in victims)
        report = run(
            Scenario(
                nodes=nodes,
                duration=warmup + 5.0 + 10.0,
                interval=interval,
                jitter=jitter if jitter is not None else Jitter.typical(),
                observer=observer if observer is not None else Observer(),
                kills=kills,
                seed=seed + trial,
                config=config,
            )
        )
        times.extend(report.detection.values())
        undetected += len(report.undetected)
        false_positives += len(report.false_suspects) + len(report.false_deads)
    return times, undetected, false_positives
