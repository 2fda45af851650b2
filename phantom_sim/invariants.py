"""The invariants, checked as the history runs (safety) and at its end (liveness).

Safety checks run at the moment the state they judge changes (a map committed,
a map accepted by a consumer, a membership verdict, a selection), which is
after every simulator step that could break them. Each violation is recorded
with the step and virtual time it happened at.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from phantom_bus.shardmap import SERVING, ShardMap

from .world import Proc, World

NAMES = (
    "one_primary_per_epoch",
    "one_map_per_epoch",
    "serving_replicas_hold_data",
    "planned_move_keeps_replicas",
    "epochs_never_go_back",
    "committed_map_survives",
    "writes_go_to_the_primary",
    "deposed_leader_write_lands",
    "no_false_dead_on_observer_pause",
    "node_state_never_goes_back",
    "newest_verdict_taken",
    "dead_node_loses_replicas",
    "live_nodes_healthy_again",
)


@dataclass(frozen=True, slots=True)
class Violation:
    invariant: str
    step: int
    time: float
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant} at step {self.step} (t={self.time:.3f}): {self.detail}"


def _fingerprint(m: ShardMap) -> bytes:
    return m.pack()


def _live(m: ShardMap, replicas: Iterable[Any]) -> set[str]:
    return {r.node for r in replicas if r.role in SERVING and r.node not in m.down}


class Invariants:
    """Receives what the simulated shells report; see :class:`phantom_sim.shells.Checker`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.violations: list[Violation] = []
        self.checks: dict[str, int] = dict.fromkeys(NAMES, 0)
        self.by_epoch: dict[int, bytes] = {}
        self.maps: dict[int, ShardMap] = {}
        self.last: ShardMap | None = None
        self.max_committed = -1
        self.seen: dict[str, int] = {}
        self.holders: dict[str, set[str]] = {}
        self.observer_only = False
        self.dead_verdicts: list[str] = []
        self.node_versions: dict[tuple[str, str], tuple[int, int]] = {}

    def fail(self, invariant: str, detail: str) -> None:
        w = self.world
        self.violations.append(Violation(invariant, w.stats.steps, w.now, detail))

    # -- the shard map ---------------------------------------------------------------

    def committed(self, writer: str, m: ShardMap, reason: str) -> None:
        self.checks["one_primary_per_epoch"] += 1
        for _, sh in m.shards():
            primaries = [r.node for r in sh.replicas if r.role == "primary"]
            if len(primaries) > 1:
                self.fail("one_primary_per_epoch", f"epoch {m.epoch} shard {sh.id} has primaries {primaries}")
        self.checks["one_map_per_epoch"] += 1
        fp = _fingerprint(m)
        old = self.by_epoch.get(m.epoch)
        if old is not None and old != fp:
            self.fail("one_map_per_epoch", f"{writer} committed a second, different map at epoch {m.epoch}")
        self.by_epoch[m.epoch] = fp
        self.maps[m.epoch] = m
        self._data(m)
        self._moves(m, reason)
        self.last = m
        self.max_committed = max(self.max_committed, m.epoch)

    def _data(self, m: ShardMap) -> None:
        """A replica serves (primary/replica) only once it holds a copy (an initial one, or a finished copy)."""
        self.checks["serving_replicas_hold_data"] += 1
        prev = self.last
        for _, sh in m.shards():
            held = self.holders.get(sh.id)
            nodes = {r.node for r in sh.replicas}
            if held is None:  # the first placement of an empty shard: nothing to copy
                self.holders[sh.id] = {r.node for r in sh.replicas if r.role in SERVING}
                continue
            held &= nodes  # a node dropped from the shard drops its data
            before: dict[str, str] = {}
            if prev is not None and any(s.id == sh.id for _, s in prev.shards()):
                before = {r.node: r.role for r in prev.shard(sh.id).replicas}
            for r in sh.replicas:
                if r.role not in SERVING or r.node in held:
                    continue
                if not held:
                    held.add(r.node)  # no copy exists anywhere: the shard starts over empty
                    continue
                self.fail("serving_replicas_hold_data",
                          f"epoch {m.epoch} shard {sh.id}: {r.node} is {r.role} (was {before.get(r.node)}) "
                          f"without a finished copy; copies on {sorted(held)}")
                held.add(r.node)

    def copied(self, shard: str, node: str) -> None:
        m = self.last
        if m is None:
            return
        try:
            role = m.shard(shard).role_of(node)
        except Exception:
            return
        if role is not None:
            self.holders.setdefault(shard, set()).add(node)

    def _moves(self, m: ShardMap, reason: str) -> None:
        prev = self.last
        if prev is None or not (m.down <= prev.down) or reason in ("node.dead", "node.removed"):
            return
        self.checks["planned_move_keeps_replicas"] += 1
        for ks in m.keyspaces:
            rf = ks.rf
            for sh in ks.shards:
                try:
                    old = prev.shard(sh.id)
                except Exception:
                    continue
                before = len(_live(prev, old.replicas))
                after = len(_live(m, sh.replicas))
                if after < min(before, rf):
                    self.fail("planned_move_keeps_replicas",
                              f"epoch {prev.epoch}->{m.epoch} ({reason}) shard {sh.id}: "
                              f"live replicas {before} -> {after}")

    def restored(self, proc: Proc, m: ShardMap) -> None:
        self.checks["committed_map_survives"] += 1
        if m.epoch < self.max_committed:
            self.fail("committed_map_survives",
                      f"{proc.name} restarted at epoch {m.epoch}; epoch {self.max_committed} had been committed")
        elif self.by_epoch.get(m.epoch) not in (None, _fingerprint(m)):
            self.fail("committed_map_survives", f"{proc.name} restarted with a different map at epoch {m.epoch}")
        self.last = m

    def accepted(self, consumer: str, m: ShardMap) -> None:
        self.checks["epochs_never_go_back"] += 1
        seen = self.seen.get(consumer, -1)
        if m.epoch < seen:
            self.fail("epochs_never_go_back", f"{consumer} accepted epoch {m.epoch} after epoch {seen}")
        self.seen[consumer] = max(seen, m.epoch)
        self.checks["one_map_per_epoch"] += 1
        fp = self.by_epoch.get(m.epoch)
        if fp is None:
            self.fail("one_map_per_epoch", f"{consumer} accepted epoch {m.epoch}, which was never committed")
        elif fp != _fingerprint(m):
            self.fail("one_map_per_epoch",
                      f"{consumer} accepted a map at epoch {m.epoch} that is not the committed one")

    def selected(self, sel: dict[str, Any]) -> None:
        self.checks["writes_go_to_the_primary"] += 1
        m = self.maps.get(sel["epoch"])
        if m is None:
            return
        primary = m.shard(sel["shard"]).primary
        if sel["node"] != primary:
            self.fail("writes_go_to_the_primary",
                      f"write for {sel['key']} sent to {sel['node']} at epoch {sel['epoch']}; primary is {primary}")

    # -- leaders -----------------------------------------------------------------------

    def fenced_write(self, writer: str, term: int, current: int | None, landed: bool) -> None:
        """A leader's write reached the store: it must land only if ``term`` is the current term."""
        self.checks["deposed_leader_write_lands"] += 1
        if landed and current != term:
            self.fail("deposed_leader_write_lands",
                      f"{writer} wrote in term {term} while the current term is {current}")

    def node_state(self, consumer: str, node: str, version: tuple[int, int] | None) -> None:
        """A consumer of membership's verdicts took a state: its version never goes back."""
        self.checks["node_state_never_goes_back"] += 1
        if version is None:
            return
        key = (consumer, node)
        held = self.node_versions.get(key)
        if held is not None and version < held:
            self.fail("node_state_never_goes_back",
                      f"{consumer} holds {node} at version {list(version)} after {list(held)}")
            return
        self.node_versions[key] = version

    def verdict(self, consumer: str, node: str, term: int, fields: dict[str, Any], held: Any, taken: bool) -> None:
        """A verdict of the newest membership leader reached a consumer. Refusing it is
        right when it is stale (the leader has moved on since) or what is held already
        says the same; refusing what the leader says *now* is not."""
        self.checks["newest_verdict_taken"] += 1
        state = fields.get("state")
        if taken or held is None or held[0] == state:
            return
        version = fields.get("version")
        if version is not None and held[1] is not None and version[0] < held[1][0]:
            # An older incarnation: refusing it is the versioning's point.
            return
        leader = next((p for p in self.world.services.get("membership", ())
                       if p.up and p.leadership.is_leader), None)  # type: ignore[attr-defined]
        if leader is None:
            return
        try:
            now = leader.core.member(node, self.world.now)  # type: ignore[attr-defined]
        except Exception:
            return
        current = (now.get("incarnation"), leader._wire_change(leader.leadership.term, now.get("change")))  # type: ignore[attr-defined]
        if now.get("state") == state and (version is None or tuple(version) == current):
            self.fail("newest_verdict_taken",
                      f"{consumer} refused {node} {state} at version {list(version or ())} of membership "
                      f"term {term}, what the leader holds now, keeping {held[0]} at {list(held[1] or ())}")

    # -- membership --------------------------------------------------------------------

    def member_event(self, kind: str, data: dict[str, Any]) -> None:
        if self.observer_only:
            self.checks["no_false_dead_on_observer_pause"] += 1
        if kind == "member.dead":
            self.dead_verdicts.append(str(data.get("node")))
            if self.observer_only:
                self.fail("no_false_dead_on_observer_pause",
                          f"{data.get('node')} declared dead ({data.get('reason')}) while only membership paused")
