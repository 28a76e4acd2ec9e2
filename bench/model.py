"""A discrete-event model (SimPy) of filch's work stealing, 3 to 1,000 nodes.

What is modelled, and what each cost stands for (seconds unless named otherwise):
- one etcd raft group: a write transaction waits its turn at a commit ceiling
  (`txn_per_s`), then its latency `l_txn`; a read costs `l_read`. Every committed queue
  change and node-record write is one watch event, delivered to the nodes that watch it,
  which also loads etcd (`fanout_per_s` deliveries a second at most).
- OLD and RANKED: every node decodes every event (`c_event` of agent CPU each). SHARDED
  (bench/model_shard.py): a queue event reaches its task's chain (min(N, `watchers`)
  nodes), a node record every node; a node pays `c_response` per watch response (one per
  transaction that touched what it watches) plus `c_event_batched` per event. Watch
  responses come in ticks of `l_watch`, so a node sees the queue `l_watch` late plus its
  decode time (bench/model_cluster.py: the nodes, etcd, the watch, the node records).
- the stealer: before a pass a node waits steal_delay x load + jitter, picks from the
  head of the queue it sees, reads the picked records (old protocol: the head 64) in one
  round trip and tries them in one transaction. OLD: any task already taken voids the
  whole batch (batch halves on a loss, doubles on a win). RANKED: each task has a
  rendezvous rank per node (rank r may try r x `step` after the task became visible,
  anyone after r_max x step), the node picks the tasks it ranks best, then oldest,
  and a task already taken fails alone (nested transactions). SHARDED: the same nested
  transactions; the chain's first node not recorded full tries at once, rank r after r x
  its own step (steal_delay + 2 x its moving average of read+steal time), other nodes
  after a relist (every `sweep_interval`) and max_rank steps.
- a stolen task costs its node `c_run` (steal, spawn, finish) plus the task's own CPU
  `c_task`, then a share `f_finish` of a finish transaction (finishes are batched).
- the submit client: `client_inflight` submits at once, `c_client` of its CPU and
  `c_submit` of the receiving agent's each, `f_submit` of a transaction (group commit).
- node records: OLD, every busy node rewrites its own 5 times a second; RANKED, at most
  `records_per_s` writes in the whole cluster; SHARDED, each node on change every
  max(`record_debounce`, N / `cluster_records_per_s`) s.
- CPU: `shared_cores` set (calibration: every agent, etcd, the client and the tasks of a
  one-machine benchmark share those cores), or None (predictions: each node has its own
  machine; an agent is one Python thread, so its event decoding and stealing share one
  core, and the tasks run on the node's other cores; etcd runs on its own machines and
  is only limited by its ceilings).

The calibration and the sweep are in bench/model_run.py (`python -m bench.model`).
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from bench import model_shard as shard
from bench.model_cluster import Cluster, Node, Proc, Task
from bench.model_types import Params, Result, Workload

__all__ = ["Model", "Params", "Result", "Workload", "simulate"]

# A node with room waits this long at most between looks at the queue when nothing woke
# it (filch's sweep is 5 s; a shorter one only costs simulation time, never correctness).
IDLE_RECHECK = 0.5


class Model(Cluster):
    """One simulated run; `run()` returns its Result."""

    def __init__(self, *, params: Params, workload: Workload, seed: int = 1) -> None:
        super().__init__(params=params, seed=seed)
        self.w = workload
        self.backlog: deque[float] = deque()                     # arrivals not yet sent
        self.tasks: list[Task] = []
        self.in_flight = 0
        self.arrivals_done = False
        self.completed: list[float] = []


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
            task = Task(ident=ident, arrival=arrival, ranks=ranks,
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
    def _reads(self, node: Node) -> list[Task]:
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

    def _stealer(self, node: Node) -> Proc:
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

    def _candidates(self, node: Node) -> list[Task]:
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

    def _head(self) -> list[Task]:
        head = []
        for task in self.view.values():
            head.append(task)
            if len(head) >= self.p.window:
                break
        return head

    def _run(self, node: Node, task: Task) -> Proc:
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
                window_tasks: list[Task]) -> Result:
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
