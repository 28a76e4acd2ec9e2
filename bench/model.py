"""A discrete-event model (SimPy) of filch's work stealing, 3 to 1,000 nodes.

What is modelled, and what each cost stands for (seconds unless named otherwise):
- one etcd raft group: a write transaction waits its turn at a commit ceiling
  (`txn_per_s`), then its latency `l_txn`; a read costs `l_read`. Every committed queue
  change and node-record write is one watch event delivered to every node, which also
  loads etcd (`fanout_per_s` deliveries a second at most).
- every node decodes every event (`c_event` of agent CPU each); watch responses come
  in ticks of `l_watch`, so a node sees the queue `l_watch` late plus its decode time.
- the stealer: before a pass a node waits steal_delay x load + jitter, picks from the
  head of the queue it sees, reads the picked records (old protocol: the head 64) in one
  round trip and tries them in one transaction. OLD: any task already taken voids the
  whole batch (batch halves on a loss, doubles on a win). NEW: each task has a
  rendezvous rank per node (rank r may try r x `step` after the task became visible,
  anyone after r_max x step), the node picks the tasks it ranks best, then oldest,
  and a task already taken fails alone (nested transactions).
- a stolen task costs its node `c_run` (steal, spawn, finish) plus the task's own CPU
  `c_task`, then a share `f_finish` of a finish transaction (finishes are batched).
- the submit client: `client_inflight` submits at once, `c_client` of its CPU and
  `c_submit` of the receiving agent's each, `f_submit` of a transaction (group commit).
- node records: OLD, every busy node rewrites its own 5 times a second; NEW, at most
  `records_per_s` writes in the whole cluster.
- CPU: `shared_cores` set (calibration: every agent, etcd, the client and the tasks of a
  one-machine benchmark share those cores), or None (predictions: each node has its own
  machine; an agent is one Python thread, so its event decoding and stealing share one
  core, and the tasks run on the node's other cores; etcd runs on its own machines and
  is only limited by its ceilings).

The calibration and the sweep are in bench/model_run.py (`python -m bench.model`).
"""

from __future__ import annotations

import math
import random
import statistics
from collections import OrderedDict, deque
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

import simpy

from bench import model_shard as shard
from bench.model_types import Params, Result, Workload

__all__ = ["Model", "Params", "Result", "Workload", "simulate"]

Proc = Generator[simpy.events.Event, Any, Any]

# A node with room waits this long at most between looks at the queue when nothing woke
# it (filch's sweep is 5 s; a shorter one only costs simulation time, never correctness).
IDLE_RECHECK = 0.5


@dataclass(eq=False)
class _Task:
    ident: int
    arrival: float
    ranks: tuple[int, ...]
    visible: float = -1.0
    queued: bool = False
    started: float = -1.0
    txn: int = 0             # the (group-committed) submit transaction that queued it


class _Node:
    def __init__(self, *, sim: Model, index: int) -> None:
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
        self.chain_view: OrderedDict[int, _Task] = OrderedDict()
        self.steal_seconds = 0.0
        self.recorded_full = False
        self.recorded_free = self.free
        self.relist_phase = sim.rng.uniform(0, sim.p.sweep_interval)

    def poke(self) -> None:
        if self.waiting and not self.wake.triggered:
            self.wake.succeed()

    def rank_of(self, task: _Task) -> int:
        p = self.sim.p
        if p.protocol == "sharded":
            return shard.rank(self.sim.nodes, task.ranks, self.index, p.max_rank)
        return task.ranks.index(self.index) if self.index in task.ranks else p.r_max

    def step(self) -> float:
        p = self.sim.p
        if p.protocol == "sharded":
            return p.steal_delay + 2 * self.steal_seconds
        return p.step

    def seen(self, task: _Task, rank: int) -> float:
        """When this node learnt of the task: its watch, or (outside the chain) a relist."""
        p = self.sim.p
        if p.protocol != "sharded" or rank < p.max_rank:
            return task.visible
        return shard.first_relist(task.visible, self.relist_phase, p.sweep_interval)

    def may_try(self, task: _Task, now: float) -> bool:
        if self.sim.p.protocol == "old":
            return True
        rank = self.rank_of(task)
        return now - self.seen(task, rank) >= rank * self.step() - 1e-12


class Model:
    """One simulated run; `run()` returns its Result."""

    def __init__(self, *, params: Params, workload: Workload, seed: int = 1) -> None:
        self.p = params
        self.w = workload
        self.rng = random.Random(seed)
        self.env = simpy.Environment()
        self.shared = (simpy.Resource(self.env, params.shared_cores)
                       if params.shared_cores else None)
        self.etcd = simpy.Resource(self.env, 1)
        self.nodes = [_Node(sim=self, index=i) for i in range(params.nodes)]
        self.queue: OrderedDict[int, _Task] = OrderedDict()     # committed, still queued
        self.view: OrderedDict[int, _Task] = OrderedDict()      # what the nodes see
        self.log: list[tuple[str, _Task | None, int]] = []      # committed, not yet seen
        self.backlog: deque[float] = deque()                     # arrivals not yet sent
        self.tasks: list[_Task] = []
        self.in_flight = 0
        self.arrivals_done = False
        self.rho = 0.0                                           # per-node decode load
        self.txn_ids = 0
        self.count = {"txns": 0.0, "events": 0, "passes": 0, "records": 0,
                      "agent_cpu": 0.0, "etcd_cpu": 0.0, "attempted": 0, "lost": 0,
                      "decode_cpu": 0.0, "deliveries": 0}
        self.completed: list[float] = []

    # -- resources -------------------------------------------------------------
    def _cpu(self, resource: simpy.Resource, seconds: float) -> Proc:
        if seconds <= 0:
            return
        with resource.request() as request:
            yield request
            yield self.env.timeout(seconds)

    def _agent(self, node: _Node, seconds: float, *, count: bool = True) -> Proc:
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

    def _event(self, kind: str, task: _Task | None, txn: int) -> None:
        self.count["events"] += 1
        self.log.append((kind, task, txn))

    def _recipients(self, task: _Task | None) -> tuple[int, ...] | None:
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

    def _apply(self, batch: list[tuple[str, _Task | None, int]]) -> None:
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

    def _poke_later(self, task: _Task, nodes: list[_Node] | None, delay: float) -> Proc:
        yield self.env.timeout(delay)
        if task.ident in self.view:
            for node in nodes if nodes is not None else self.nodes:
                node.poke()

    def _relist(self, node: _Node) -> Proc:
        """SHARDED, more nodes than a chain: every sweep a node lists the whole queue and
        may try what it found outside its chains after max_rank steps."""
        p = self.p
        yield self.env.timeout(node.relist_phase)
        while True:
            self.count["etcd_cpu"] += p.c_etcd_read
            self.env.process(self._poke_after(node, p.max_rank * node.step()))
            yield self.env.timeout(p.sweep_interval)

    def _poke_after(self, node: _Node, delay: float) -> Proc:
        yield self.env.timeout(delay)
        node.poke()

    # -- the client -------------------------------------------------------------
    def _arrivals(self) -> Proc:
        w = self.w
        if w.burst:
            self.backlog.extend([0.0] * w.burst)
        else:
            while self.env.now < w.seconds:
                self.backlog.append(self.env.now)
                yield self.env.timeout(self.rng.expovariate(w.rate))
        self.arrivals_done = True

    def _submitter(self, index: int) -> Proc:
        p = self.p
        while True:
            if not self.backlog:
                if self.arrivals_done:
                    return
                yield self.env.timeout(0.0005)
                continue
            arrival = self.backlog.popleft()
            if self.w.burst:
                arrival = self.env.now
            self.in_flight += 1
            node = self.nodes[(len(self.tasks) + index) % p.nodes]
            ident = len(self.tasks)
            if p.protocol == "sharded":
                # The shard's slice owner, then the next nodes: the task's chain.
                ranks = shard.chain(self.rng.randrange(p.nodes), p.nodes, p.watchers)
            else:
                ranks = tuple(self.rng.sample(range(p.nodes), min(p.r_max, p.nodes)))
            # Group commit: consecutive submits share a transaction (and a watch response).
            task = _Task(ident=ident, arrival=arrival, ranks=ranks,
                         txn=-1 - int(ident * p.f_submit))
            self.tasks.append(task)
            if self.shared is not None:
                yield from self._cpu(self.shared, p.c_client)
            yield from self._agent(node, p.c_submit)
            yield from self._txn(p.f_submit)
            task.queued = True
            self.queue[task.ident] = task
            self._event("put", task, task.txn)
            self.in_flight -= 1

    # -- the stealer ------------------------------------------------------------
    def _reads(self, node: _Node) -> list[_Task]:
        """The records a pass reads, best first (what the node's view of the queue offers)."""
        p, now = self.p, self.env.now
        head = self._candidates(node)
        if p.protocol == "old":
            # The old stealer read the records of the head of its view (PASS_LIMIT).
            return head
        mine = [t for t in head if node.may_try(t, now)]
        # Lower ranks first, then oldest; outside the chain a tie-break of its own per node.
        mine.sort(key=lambda t: (node.rank_of(t), hash((node.index, t.ident)) % 1000003
                                 if node.rank_of(t) >= p.max_rank else t.ident))
        return mine[:min(node.free, node.batch)]

    def _wakeup_latency(self) -> float:
        """On one machine the agent that wakes up waits for the kernel to run it: CFS runs
        every runnable process once per period, max(sched_latency, n x min_granularity),
        both scaled by 1 + log2(cores) (6 ms and 0.75 ms unscaled). The agents are the
        runnable processes that matter here; the wait is uniform over half a period."""
        if self.shared is None:
            return 0.0
        scale = 1 + math.log2(self.p.shared_cores or 1)
        period = max(0.006 * scale, self.p.nodes * 0.00075 * scale)
        return self.rng.uniform(0, period / 2)

    def _stealer(self, node: _Node) -> Proc:
        p = self.p
        idle = False       # nothing to try: wait for news (filch's _work)
        while True:
            if idle or node.free == 0 or not any(node.may_try(t, self.env.now) for t in
                                                 self._candidates(node)):
                node.waiting = True
                node.wake = self.env.event()
                yield node.wake | self.env.timeout(IDLE_RECHECK)
                node.waiting = False
                idle = False
                continue
            load = 1 - node.free / p.slots
            yield self.env.timeout(p.steal_delay * load
                                   + self.rng.uniform(0, p.steal_delay * p.jitter)
                                   + self._wakeup_latency())
            reads = self._reads(node)
            if not reads:
                idle = True
                continue
            began = self.env.now
            self.count["passes"] += 1
            self.count["records"] += len(reads)
            yield from self._etcd_cpu(p.c_etcd_read + len(reads) * p.c_etcd_record)
            yield self.env.timeout(p.l_read)
            # The records read are current: a task another node took since this node's
            # view was updated is seen as taken here, and not tried.
            picks = [t for t in reads if t.queued][:min(node.free, node.batch)]
            # Decoding the records, choosing, building the transaction: on the event loop.
            yield from self._agent(node, p.c_pass + len(reads) * p.c_record)
            if not picks:
                idle = True
                continue
            node.free -= len(picks)
            yield from self._txn(1.0)
            node.steal_seconds += p.steal_weight * (
                min(p.max_steal_seconds, self.env.now - began) - node.steal_seconds)
            won = [t for t in picks if t.queued]
            if p.protocol == "old" and len(won) < len(picks):
                won = []
            lost = len(picks) - len(won)
            self.count["attempted"] += len(picks)
            self.count["lost"] += lost
            self.txn_ids += 1
            for task in won:
                task.queued = False
                del self.queue[task.ident]
                self._event("delete", task, self.txn_ids)
            node.free += lost
            # A pass that took nothing waits for news: a new task or a freed slot (the
            # stealer of the measured runs; a won steal looks again at once).
            idle = not won
            node.batch = (max(1, node.batch // 2) if lost
                          else min(p.max_batch, node.batch * 2))
            for task in won:
                self.env.process(self._run(node, task))

    def _candidates(self, node: _Node) -> list[_Task]:
        """The tasks a node knows of: SHARDED, its chains' (by its watch) and, with more
        nodes than a chain, the head of the queue (by its relists); else the head."""
        if self.p.protocol != "sharded":
            return self._head()
        out = []
        for task in node.chain_view.values():
            out.append(task)
            if len(out) >= self.p.window:
                break
        if self.p.nodes > self.p.watchers:
            out += [t for t in self._head() if node.index not in t.ranks]
        return out

    def _head(self) -> list[_Task]:
        head = []
        for task in self.view.values():
            head.append(task)
            if len(head) >= self.p.window:
                break
        return head

    def _run(self, node: _Node, task: _Task) -> Proc:
        p = self.p
        yield from self._agent(node, p.c_run / 2)
        task.started = self.env.now
        yield from self._cpu(node.cores, p.c_task)
        yield self.env.timeout(p.t_exec)
        yield from self._agent(node, p.c_run / 2)
        yield from self._txn(p.f_finish)
        self.completed.append(self.env.now)
        node.free += 1
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

    def _node_records(self, node: _Node) -> Proc:
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

    def _record_write(self, node: _Node | None = None) -> Proc:
        yield from self._txn(1.0)
        self.txn_ids += 1
        self._event("record", None, self.txn_ids)
        if node is not None:
            node.recorded_full = node.recorded_free == 0

    # -- one run --------------------------------------------------------------------
    def run(self) -> Result:
        """Simulate the workload (burst: until every task finished, at most 600 simulated
        seconds; rate: `seconds` of arrivals, measured after the warm-up) and measure."""
        w, env = self.w, self.env
        env.process(self._arrivals())
        for index in range(self.p.client_inflight):
            env.process(self._submitter(index))
        for node in self.nodes:
            env.process(self._stealer(node))
        env.process(self._deliver())
        if self.p.protocol == "sharded":
            for node in self.nodes:
                env.process(self._node_records(node))
                if self.p.nodes > self.p.watchers:
                    env.process(self._relist(node))
        else:
            env.process(self._records())
        if w.burst:
            limit = 600.0
            while len(self.completed) < w.burst and env.now < limit:
                env.run(until=env.now + 0.25)
            first = 0.0
            end = max(self.completed) if self.completed else env.now
            span = end - first
            measured = self.completed
            window_tasks = self.tasks
        else:
            env.run(until=w.seconds)
            start = w.seconds * w.warmup
            span = w.seconds - start
            measured = [t for t in self.completed if t >= start]
            window_tasks = [t for t in self.tasks if t.arrival >= start]
        return self._result(measured, span, window_tasks)

    def _result(self, measured: list[float], span: float,
                window_tasks: list[_Task]) -> Result:
        done = len(self.completed) or 1
        c = self.count
        waits = sorted(t.started - t.arrival for t in window_tasks if t.started >= 0)
        # Arrivals not started by the end, submitted or still in the client's backlog.
        unstarted = [t.arrival for t in window_tasks if t.started < 0]
        if self.w.rate:
            unstarted += [a for a in self.backlog if a >= self.w.seconds * self.w.warmup]
        offered = len(waits) + len(unstarted)
        saturated = bool(self.w.rate) and len(unstarted) > max(10, 0.05 * offered)
        if saturated:
            # Tasks never started count as waiting until the end (a lower bound).
            waits += [self.env.now - a for a in unstarted]
            waits.sort()

        def pct(q: float) -> float:
            return waits[min(len(waits) - 1, int(q * len(waits)))] if waits else 0.0

        return Result(
            throughput=len(measured) / span if span > 0 else 0.0,
            submitted=len(self.tasks), completed=len(self.completed),
            attempted=int(c["attempted"]), lost=int(c["lost"]),
            start_p50=pct(0.5), start_p99=pct(0.99),
            agent_cpu_per_task=c["agent_cpu"] / done, etcd_cpu_per_task=c["etcd_cpu"] / done,
            txns_per_task=c["txns"] / done, events_per_task=c["events"] / done,
            passes_per_task=c["passes"] / done, records_per_task=c["records"] / done,
            saturated=saturated,
            watch_cpu_share=(c["decode_cpu"] / self.p.nodes / self.env.now
                             if self.env.now else 0.0),
            deliveries_per_task=c["deliveries"] / done,
            extra={"mean_start": statistics.fmean(waits) if waits else 0.0})


def simulate(params: Params, workload: Workload, *, seed: int = 1) -> Result:
    """Run the model once (deterministic for a seed)."""
    return Model(params=params, workload=workload, seed=seed).run()


if __name__ == "__main__":
    from bench.model_run import main
    raise SystemExit(main())
