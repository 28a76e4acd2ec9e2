"""The inputs and outputs of the stealing model (bench/model.py): a cluster and its
costs, a workload, and what one run measured."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, kw_only=True)
class Params:
    """One cluster and its costs. Defaults: this machine's loopback figures of 2026-11-27."""
    nodes: int = 3
    slots: int = 20                  # tasks at once per node: --cpus 2, 0.1 CPU per `true`
    protocol: str = "sharded"        # "sharded" (chains, main since 2026-12-07), "ranked"
                                     # (rendezvous ranks, nested txns), "old" (flat batches)
    shared_cores: int | None = 2     # None: a machine per node
    cores_per_node: int = 2
    l_txn: float = 0.003             # commit latency, 3 members on loopback
    l_read: float = 0.001
    l_watch: float = 0.001           # commit -> watch response on a node (one tick)
    txn_per_s: float = 3500.0        # commit ceiling (bench/ceilings.py, 64 in flight)
    fanout_per_s: float = 1e6        # watch deliveries/s etcd sustains (assumed, see docs)
    c_event: float = 80e-6           # agent CPU per watch event decoded
    c_pass: float = 300e-6           # agent CPU per steal pass (build read + txn, answer)
    c_record: float = 10e-6          # agent CPU per record read
    c_submit: float = 0.45e-3        # receiving agent's CPU per submit
    c_run: float = 1.05e-3           # agent CPU per task run (steal won, spawn, finish)
    c_task: float = 2.1e-3           # the task's own CPU (`true`, process executor)
    c_client: float = 0.25e-3
    c_etcd_txn: float = 0.8e-3       # etcd CPU per write txn (shared mode only)
    c_etcd_read: float = 0.15e-3     # ... per read request
    c_etcd_record: float = 10e-6     # ... per record it returns
    c_etcd_fan: float = 5e-6         # ... per event delivered to one watcher
    t_exec: float = 1e-3             # wall time of `true` beyond its CPU
    f_submit: float = 0.35           # txns per submit (group commit)
    f_finish: float = 0.35           # txns per finish (batched finish writes)
    client_inflight: int = 32
    steal_delay: float = 0.05
    jitter: float = 0.1              # fraction of steal_delay
    step: float = 0.05               # RANKED: delay per rank
    r_max: int = 3
    window: int = 64                 # head of the queue a pass looks at (PASS_LIMIT)
    max_batch: int = 32              # node/core/limits.py MAX_BATCH
    initial_batch: int = 4
    records_per_s: float = 20.0      # RANKED: node-record writes, cluster-wide
    record_rate_busy: float = 5.0    # OLD: per busy node
    # SHARDED (node/scheduling/ranking.py, node/running/membership.py):
    watchers: int = 4                # nodes in a chain (WATCHERS)
    max_rank: int = 4                # outside the chain: tried after this many steps
    sweep_interval: float = 5.0      # relist of the whole priority index
    steal_weight: float = 0.2        # moving average of read+steal time (newest's weight)
    max_steal_seconds: float = 0.5
    cluster_records_per_s: float = 10.0   # each node every N/10 s ...
    record_debounce: float = 0.2          # ... at least this far apart, when changed
    c_response: float = 200e-6       # agent CPU per watch response (measured 130-290 us)
    c_event_batched: float = 24e-6   # ... per event in it (measured)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """`burst`: n submits as fast as the client goes (make bench's throughput runs);
    `rate`: Poisson arrivals at rate/s for `seconds`, the first `warmup` of them unmeasured."""
    burst: int = 0
    rate: float = 0.0
    seconds: float = 0.0
    warmup: float = 0.2


@dataclass(kw_only=True)
class Result:
    """What one run measured. `saturated`: the queue or the submit backlog still grew at
    the end (offered more than the cluster sustains)."""
    throughput: float = 0.0
    submitted: int = 0
    completed: int = 0
    attempted: int = 0
    lost: int = 0
    start_p50: float = 0.0
    start_p99: float = 0.0
    agent_cpu_per_task: float = 0.0
    etcd_cpu_per_task: float = 0.0
    txns_per_task: float = 0.0
    events_per_task: float = 0.0
    passes_per_task: float = 0.0
    records_per_task: float = 0.0
    saturated: bool = False
    watch_cpu_share: float = 0.0     # an agent's core spent decoding events (mean node)
    deliveries_per_task: float = 0.0  # watch events sent to nodes (events x recipients)
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def lost_share(self) -> float:
        return self.lost / self.attempted if self.attempted else 0.0
