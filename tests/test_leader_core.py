"""LeaderCore on virtual time: a simulated store with etcd's lease rules, slow messages and paused instances."""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus.leader import Campaign, Check, Deposed, Elected, Holder, LeaderCore, Release, Renew

TTL = 4.0


@dataclass
class SimStore:
    """The leader record and leases; time is the store's (the same virtual time)."""

    revision: int = 1
    record: tuple[str, int, int] | None = None  # instance, create revision (term), lease
    leases: dict[int, float] = field(default_factory=dict)  # id -> expiry
    next_lease: int = 1
    fenced_writes: list[tuple[float, str, int]] = field(default_factory=list)

    def expire(self, now: float) -> None:
        for lease, expiry in list(self.leases.items()):
            if expiry <= now:
                del self.leases[lease]
                if self.record and self.record[2] == lease:
                    self.record = None
                    self.revision += 1

    def holder(self) -> Holder | None:
        return None if self.record is None else Holder(self.record[0], self.record[1])


class Sim:
    """Instances that run their core's actions through the store with random delays and pauses."""

    def __init__(self, seed: int, instances: int, pauses: list[tuple[int, float, float]]) -> None:
        self.rng = random.Random(seed)
        self.store = SimStore()
        self.cores = [LeaderCore(f"i{n}", TTL) for n in range(instances)]
        # instance -> list of (start, end) pauses
        self.pauses: dict[int, list[tuple[float, float]]] = {n: [] for n in range(instances)}
        for who, start, length in pauses:
            self.pauses[who % instances].append((start, start + length))
        self.queue: list[tuple[float, int, int, str, object]] = []
        self.seq = 0
        self.terms: list[int] = []
        self.violations: list[str] = []

    def resume_time(self, who: int, t: float) -> float:
        """When instance ``who`` next runs at or after ``t`` (it is frozen during a pause)."""
        moved = True
        while moved:
            moved = False
            for start, end in self.pauses[who]:
                if start <= t < end:
                    t, moved = end, True
        return t

    def push(self, t: float, who: int, kind: str, data: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, who, kind, data))

    def delay(self) -> float:
        return self.rng.choice([0.001, 0.01, 0.05, 0.2, 0.6])

    def check(self, now: float) -> None:
        leading = [c.instance for c in self.cores if c.is_leader(now)]
        if len(leading) > 1:
            self.violations.append(f"t={now:.3f}: {leading} all believe they lead")

    def run(self, until: float) -> None:
        for n in range(len(self.cores)):
            self.push(self.rng.random(), n, "wake")
        while self.queue:
            t, _, who, kind, data = heapq.heappop(self.queue)
            if t > until:
                break
            run_at = self.resume_time(who, t)
            if run_at != t and kind != "apply":
                self.push(run_at, who, kind, data)  # frozen: handle it when the pause ends
                continue
            core = self.cores[who]
            if kind == "apply":
                self.apply(t, who, data)
            elif kind == "reply":
                self.reply(t, who, data)
            else:
                self.step(t, who)
            for event in core.drain():
                if isinstance(event, Elected):
                    self.terms.append(event.term)
            self.check(t)

    def step(self, t: float, who: int) -> None:
        core = self.cores[who]
        action = core.next(t)
        if isinstance(action, float):
            self.push(max(action, t + 1e-6), who, "wake")
            return
        if isinstance(action, Renew) and not core.is_leader(t):
            # e.g. woken from a pause past its lease: it must not act as the leader it was
            self.violations.append(f"t={t:.3f}: {core.instance} renews term {action.term} without leading")
        # Maybe the leader also makes a fenced write now, as a leader would between renewals.
        if core.is_leader(t) and self.rng.random() < 0.5:
            assert core.term is not None
            self.push(t + self.delay(), who, "apply", ("write", t, core.term))
        self.push(t + self.delay(), who, "apply", (action, t))

    def apply(self, t: float, who: int, data: object) -> None:
        store = self.store
        store.expire(t)
        assert isinstance(data, tuple)
        if data[0] == "write":
            _, sent, term = data
            if store.record is not None and store.record[1] == term:
                # Accepted: the writer's record is the current one, so nobody else leads by the store.
                store.fenced_writes.append((t, self.cores[who].instance, term))
                if store.record[0] != self.cores[who].instance:
                    self.violations.append(f"t={t:.3f}: fenced write of {who} accepted under another's record")
            return
        action, sent = data
        result: object
        if isinstance(action, Check):
            result = store.holder()
        elif isinstance(action, Campaign):
            lease = store.next_lease
            store.next_lease += 1
            store.leases[lease] = t + TTL
            if store.record is None:
                store.revision += 1
                store.record = (self.cores[who].instance, store.revision, lease)
                result = ("won", store.revision, lease)
            else:
                result = ("lost", store.holder(), lease)
        elif isinstance(action, Renew):
            alive = action.lease in store.leases
            if alive:
                store.leases[action.lease] = t + TTL
            ours = store.record is not None and store.record[1] == action.term
            result = alive and ours
        else:
            assert isinstance(action, Release)
            if action.lease in store.leases:
                del store.leases[action.lease]
                if store.record and store.record[2] == action.lease:
                    store.record = None
                    store.revision += 1
            result = None
        self.push(t + self.delay(), who, "reply", (action, sent, result))

    def reply(self, t: float, who: int, data: object) -> None:
        core = self.cores[who]
        assert isinstance(data, tuple)
        action, sent, result = data
        if isinstance(action, Check):
            core.checked(sent, result)
        elif isinstance(action, Campaign):
            if result[0] == "won":
                core.won(sent, t, result[1], result[2])
            else:
                core.lost(sent, result[1], result[2])
        elif isinstance(action, Renew):
            if result:
                core.renewed(sent, t)
            else:
                core.renew_failed(sent, t, True, "lease or record lost")
        else:
            core.released()
        self.push(t, who, "wake")


pauses = st.lists(
    st.tuples(st.integers(0, 3), st.floats(0, 60), st.sampled_from([0.5, 2.0, 3.5, 5.0, 12.0])), max_size=6
)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32), instances=st.integers(2, 4), pauses=pauses)
def test_no_two_instances_ever_believe_they_lead(seed: int, instances: int, pauses: list) -> None:
    sim = Sim(seed, instances, pauses)
    sim.run(80.0)
    assert sim.violations == []
    assert sim.terms, "nobody was ever elected"


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32), instances=st.integers(2, 4), pauses=pauses)
def test_terms_strictly_increase(seed: int, instances: int, pauses: list) -> None:
    sim = Sim(seed, instances, pauses)
    sim.run(80.0)
    assert sim.terms == sorted(set(sim.terms))


def campaigning() -> LeaderCore:
    """A core that found no leader at 0 and sent its campaign at 0."""
    core = LeaderCore("a", TTL)
    core.next(0.0)
    core.checked(0.0, None)
    core.next(0.0)
    return core


def test_a_paused_leader_that_wakes_past_its_lease_does_not_act() -> None:
    core = LeaderCore("a", TTL)
    assert isinstance(core.next(0.0), Check)
    core.checked(0.0, None)
    assert isinstance(core.next(0.0), Campaign)
    core.won(0.0, 0.01, term=7, lease=1)
    assert core.is_leader(0.01) and core.drain() == [Elected(7)]
    # Frozen from 0.01 to 10 s: on waking it is no longer leader, before doing anything.
    assert not core.is_leader(10.0)
    action = core.next(10.0)
    assert core.drain() == [Deposed(7, "lease not renewed within 3 s")]
    assert action == Release(1)  # give the lease back, never renew it as leader
    assert core.term is None


def test_an_election_heard_after_the_safe_time_is_not_taken() -> None:
    core = campaigning()
    core.won(0.0, 3.5, term=9, lease=4)  # sent at 0, answer read at 3.5 (> ttl - margin)
    assert not core.is_leader(3.5)
    assert core.drain() == []
    assert core.next(3.5) == Release(4)


def test_leadership_is_measured_from_the_send_time_of_the_renewal() -> None:
    core = campaigning()
    core.won(0.0, 0.0, term=3, lease=1)
    action = core.next(core.renew_every)
    assert action == Renew(1, 3)
    core.renewed(sent=1.0, now=2.9)  # a slow answer counts from when it was asked
    assert core.is_leader(1.0 + TTL - core.margin - 0.01)
    assert not core.is_leader(1.0 + TTL - core.margin)


def test_a_failed_renewal_is_retried_and_deposes_only_when_time_runs_out() -> None:
    core = campaigning()
    core.won(0.0, 0.0, term=3, lease=1)
    core.drain()
    t = core.renew_every
    while core.is_leader(t):
        action = core.next(t)
        if isinstance(action, float):
            t = action
            continue
        assert action == Renew(1, 3)
        core.renew_failed(t, t, False, "store unavailable")
    assert t >= TTL - core.margin
    core.next(t)
    assert core.drain() == [Deposed(3, "lease not renewed within 3 s")]


def test_a_follower_checks_at_the_poll_interval_while_someone_leads() -> None:
    core = LeaderCore("b", TTL)
    assert core.next(0.0) == Check()
    core.checked(0.0, Holder("a", 5))
    assert core.next(0.1) == core.poll
    assert core.next(core.poll) == Check()
    assert core.holder == Holder("a", 5)
