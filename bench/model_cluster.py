"""The cluster of the stealing model (bench/model.py): its nodes, etcd (commits, CPU), the
watch that delivers queue events and node records, and the node records' writers."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import simpy

from bench import model_shard as shard
from bench.model_types import Params

Proc = Generator[simpy.events.Event, Any, Any]


@dataclass(eq=False)
class Task:
    ident: int
    arrival: float
    ranks: tuple[int, ...]
    visible: float = -1.0
    queued: bool = False
    started: float = -1.0
    txn: int = 0             # the (group-committed) submit transaction that queued it


class Node:
    def __init__(self, *, sim: Cluster, index: int) -> None:
        self.sim = sim
        self.index = index
        self.free = sim.p.slots
        self.batch = sim.p.initial_batch
        self.wake = sim.env.event()
        self.waiting = False
        # The agent's event loop: one Python thread does its decoding, stealing and
        # submits one after the other (and, on one machine, also waits for a core).
        self.loop = simpy.Resource(sim.env, 1)
        tasks_cores = max(1, sim.p.cores_per_node - 1)
        self.cores = simpy.Resource(sim.env, tasks_cores) if sim.shared is None else sim.shared
        # SHARDED: the tasks of the chains this node is in, as its watch delivered them;
        # its read+steal time (moving average); its record as the others last saw it.
        self.chain_view: OrderedDict[int, Task] = OrderedDict()
        self.steal_seconds = 0.0
        self.recorded_full = False
        self.recorded_free = self.free
        self.relist_phase = (sim.rng.uniform(0, sim.p.sweep_interval)
                             if sim.p.protocol == "sharded" else 0.0)

    def poke(self) -> None:
        if self.waiting and not self.wake.triggered:
            self.wake.succeed()

    def rank_of(self, task: Task) -> int:
        p = self.sim.p
        if p.protocol == "sharded":
            return shard.rank(self.sim.nodes, task.ranks, self.index, p.max_rank)
        return task.ranks.index(self.index) if self.index in task.ranks else p.r_max

    def step(self) -> float:
        p = self.sim.p
        if p.protocol == "sharded":
            return p.steal_delay + 2 * self.steal_seconds
        return p.step

    def seen(self, task: Task, rank: int) -> float:
        """When this node learnt of the task: its watch, or (outside the chain) a relist."""
        p = self.sim.p
        if p.protocol != "sharded" or rank < p.max_rank:
            return task.visible
        return shard.first_relist(task.visible, self.relist_phase, p.sweep_interval)

    def may_try(self, task: Task, now: float) -> bool:
        if self.sim.p.protocol == "old":
            return True
        rank = self.rank_of(task)
        return now - self.seen(task, rank) >= rank * self.step() - 1e-12



class Cluster:
    """What every run shares: the nodes, etcd, the committed queue and the watch."""

    def __init__(self, *, params: Params, seed: int) -> None:
        self.p = params
        self.rng = random.Random(seed)
        self.env = simpy.Environment()
        self.shared = (simpy.Resource(self.env, params.shared_cores)
                       if params.shared_cores else None)
        self.etcd = simpy.Resource(self.env, 1)
        self.nodes = [Node(sim=self, index=i) for i in range(params.nodes)]
        self.queue: OrderedDict[int, Task] = OrderedDict()     # committed, still queued
        self.view: OrderedDict[int, Task] = OrderedDict()      # what the nodes see
        self.log: list[tuple[str, Task | None, int]] = []      # committed, not yet seen
        self.rho = 0.0                                           # per-node decode load
        self.txn_ids = 0
        self.count = {"txns": 0.0, "events": 0, "passes": 0, "records": 0,
                      "agent_cpu": 0.0, "etcd_cpu": 0.0, "attempted": 0, "lost": 0,
                      "decode_cpu": 0.0, "deliveries": 0}

    # -- resources -------------------------------------------------------------
    def _cpu(self, resource: simpy.Resource, seconds: float) -> Proc:
        if seconds <= 0:
            return
        with resource.request() as request:
            yield request
            yield self.env.timeout(seconds)

    def _agent(self, node: Node, seconds: float, *, count: bool = True) -> Proc:
        """Work on a node's event loop (and, on one machine, a shared core)."""
        if count:
            self.count["agent_cpu"] += seconds
        if self.shared is None and self.rho > 0:
            # This core also decodes every event: the agent's other work runs slower.
            seconds /= max(0.05, 1.0 - self.rho)
        with node.loop.request() as request:
            yield request
            if self.shared is not None:
                yield from self._cpu(self.shared, seconds)
            else:
                yield self.env.timeout(seconds)

    def _etcd_cpu(self, seconds: float) -> Proc:
        self.count["etcd_cpu"] += seconds
        if self.shared is not None:
            yield from self._cpu(self.shared, seconds)

    def _txn(self, weight: float) -> Proc:
        """A write transaction (or `weight` of one, for batched writes); returns once it
        is committed, at which point the caller applies its effects (its revision)."""
        self.count["txns"] += weight
        yield from self._etcd_cpu(weight * self.p.c_etcd_txn)
        with self.etcd.request() as request:
            yield request
            yield self.env.timeout(weight / self.p.txn_per_s)
        # Raft: the leader's proposal, the members' fsync, the apply; the compare is
        # decided at the apply, so the race window includes this latency.
        yield self.env.timeout(self.p.l_txn)

    def _event(self, kind: str, task: Task | None, txn: int) -> None:
        self.count["events"] += 1
        self.log.append((kind, task, txn))

    def _recipients(self, task: Task | None) -> tuple[int, ...] | None:
        """Who a queue event reaches (None: every node)."""
        if self.p.protocol == "sharded" and task is not None:
            return task.ranks
        return None

    # -- the watch ------------------------------------------------------------------
    def _deliver(self) -> Proc:
        p = self.p
        while True:
            yield self.env.timeout(p.l_watch)
            batch, self.log = self.log, []
            if p.protocol == "sharded":
                # One response per node and transaction, plus a little per event in it.
                fans, fan = shard.fan([(k, self._recipients(t), x) for k, t, x in batch],
                                      p.nodes)
                costs = {i: r * p.c_response + e * p.c_event_batched
                         for i, (r, e) in fans.items()}
            else:
                # Every node decodes every event (`c_event` each).
                fan = len(batch) * p.nodes
                costs = {i: len(batch) * p.c_event for i in range(p.nodes)} if batch else {}
            decode = sum(costs.values())
            self.count["deliveries"] += fan
            self.count["decode_cpu"] += decode
            self.count["agent_cpu"] += decode
            if self.shared is not None:
                # The agents decode on the shared cores, and etcd sends the events.
                self.count["etcd_cpu"] += fan * p.c_etcd_fan
                if costs:
                    decodes = [self.env.process(self._agent(self.nodes[i], cost, count=False))
                               for i, cost in costs.items()]
                    decodes.append(self.env.process(self._cpu(self.shared,
                                                              fan * p.c_etcd_fan)))
                    yield self.env.all_of(decodes)
            else:
                # The mean node's core share spent decoding slows its other work.
                load = decode / p.nodes / p.l_watch
                self.rho = 0.8 * self.rho + 0.2 * min(1.0, load)
                if fan:
                    self.env.process(self._fanout(fan))
                if self.rho > 0:
                    yield self.env.timeout(p.l_watch * self.rho / max(0.05, 1 - self.rho))
            self._apply(batch)

    def _fanout(self, deliveries: int) -> Proc:
        with self.etcd.request() as request:
            yield request
            yield self.env.timeout(deliveries / self.p.fanout_per_s)

    def _apply(self, batch: list[tuple[str, Task | None, int]]) -> None:
        now = self.env.now
        fresh = []
        sharded = self.p.protocol == "sharded"
        for kind, task, _txn in batch:
            if task is None:
                continue
            if kind == "put" and task.queued:
                task.visible = now
                self.view[task.ident] = task
                fresh.append(task)
                if sharded:
                    for index in task.ranks:
                        self.nodes[index].chain_view[task.ident] = task
            elif kind == "delete":
                self.view.pop(task.ident, None)
                if sharded:
                    for index in task.ranks:
                        self.nodes[index].chain_view.pop(task.ident, None)
        if not fresh:
            return
        if self.p.protocol == "old":
            for node in self.nodes:
                node.poke()
            return
        for task in fresh:
            # A node wakes when it comes first for a task, else at its rank's step.
            for index in task.ranks:
                node = self.nodes[index]
                rank = node.rank_of(task)
                if rank == 0:
                    node.poke()
                else:
                    self.env.process(self._poke_later(task, [node], rank * node.step()))
            if not sharded:
                self.env.process(self._poke_later(task, None, self.p.r_max * self.p.step))

    def _poke_later(self, task: Task, nodes: list[Node] | None, delay: float) -> Proc:
        yield self.env.timeout(delay)
        if task.ident in self.view:
            for node in nodes if nodes is not None else self.nodes:
                node.poke()

    def _relist(self, node: Node) -> Proc:
        """SHARDED, more nodes than a chain: every sweep a node lists the whole queue and
        may try what it found outside its chains after max_rank steps."""
        p = self.p
        yield self.env.timeout(node.relist_phase)
        while True:
            self.count["etcd_cpu"] += p.c_etcd_read
            self.env.process(self._poke_after(node, p.max_rank * node.step()))
            yield self.env.timeout(p.sweep_interval)

    def _poke_after(self, node: Node, delay: float) -> Proc:
        yield self.env.timeout(delay)
        node.poke()

    # -- node records -------------------------------------------------------------
    def _records(self) -> Proc:
        p = self.p
        while True:
            busy = sum(1 for n in self.nodes if n.free < p.slots)
            if p.protocol == "old":
                rate = p.record_rate_busy * busy
            else:
                rate = min(p.records_per_s, p.record_rate_busy * busy)
            if rate <= 0:
                yield self.env.timeout(0.1)
                continue
            yield self.env.timeout(self.rng.expovariate(rate))
            self.env.process(self._record_write())

    def _node_records(self, node: Node) -> Proc:
        """SHARDED: a node rewrites its record on change, every N/10 s at most (the whole
        cluster 10 a second), at least record_debounce apart; others see if it is full."""
        p = self.p
        interval = max(p.record_debounce, p.nodes / p.cluster_records_per_s)
        yield self.env.timeout(self.rng.uniform(0, interval))
        while True:
            if node.free != node.recorded_free:
                node.recorded_free = node.free
                self.env.process(self._record_write(node))
            yield self.env.timeout(interval)

    def _record_write(self, node: Node | None = None) -> Proc:
        yield from self._txn(1.0)
        self.txn_ids += 1
        self._event("record", None, self.txn_ids)
        if node is not None:
            node.recorded_full = node.recorded_free == 0
