"""Min-cost flow: successive shortest paths with SPFA (negative edge costs allowed).

Small and exact, for the placement planner's small clusters. Pure Python, no
I/O, deterministic: edges are explored in the order they were added.
"""

from __future__ import annotations

import math
from collections import deque

#: Cost that forces an edge's capacity to be used first (a lower bound).
FORCE = 1 << 40


class MinCostFlow:
    """A flow network; add vertices and edges, then :meth:`run`."""

    def __init__(self) -> None:
        # graph[u] = list of [to, residual capacity, cost, index of the reverse edge]
        self.graph: list[list[list[int]]] = []

    def vertex(self) -> int:
        """A new vertex's id."""
        self.graph.append([])
        return len(self.graph) - 1

    def edge(self, tail: int, head: int, cap: int, cost: int = 0) -> tuple[int, int]:
        """Add ``tail -> head``; returns a handle for :meth:`used`."""
        self.graph[tail].append([head, cap, cost, len(self.graph[head])])
        self.graph[head].append([tail, 0, -cost, len(self.graph[tail]) - 1])
        return tail, len(self.graph[tail]) - 1

    def bounded(self, tail: int, head: int, lo: int, hi: int) -> None:
        """``tail -> head`` carrying between ``lo`` and ``hi``; the ``lo`` part costs ``-FORCE`` each."""
        self.edge(tail, head, lo, -FORCE)
        self.edge(tail, head, hi - lo, 0)

    def used(self, handle: tuple[int, int]) -> int:
        """Flow on the edge behind ``handle`` (its reverse edge's residual)."""
        u, k = handle
        v, _, _, back = self.graph[u][k]
        return self.graph[v][back][1]

    def run(self, source: int, sink: int, limit: int) -> tuple[int, int]:
        """Push up to ``limit`` units at least cost; returns ``(flow, cost)``."""
        graph = self.graph
        n = len(graph)
        flow = cost = 0
        while flow < limit:
            dist = [math.inf] * n
            back = [(-1, -1)] * n
            dist[source] = 0
            queue = deque([source])
            queued = [False] * n
            queued[source] = True
            while queue:
                u = queue.popleft()
                queued[u] = False
                du = dist[u]
                for k, (v, cap, c, _) in enumerate(graph[u]):
                    if cap > 0 and du + c < dist[v]:
                        dist[v] = du + c
                        back[v] = (u, k)
                        if not queued[v]:
                            queued[v] = True
                            queue.append(v)
            if dist[sink] == math.inf:
                break
            push = limit - flow
            v = sink
            while v != source:
                u, k = back[v]
                push = min(push, graph[u][k][1])
                v = u
            v = sink
            while v != source:
                u, k = back[v]
                e = graph[u][k]
                e[1] -= push
                graph[v][e[3]][1] += push
                v = u
            flow += push
            cost += push * int(dist[sink])
        return flow, cost
