"""Every Prometheus collector filch exports, defined once (prefix filch_, base units).

Per-node series carry no node label: Prometheus adds `instance`. Cluster-wide gauges
(queue depth, tasks by state) are the same on every node; dashboards take max() of them.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

from node.core.keys import DEFAULT_OWNER

# Latency buckets from a millisecond (a local etcd round trip) to a minute (a long queue).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                   30, 60)
# Task run times: batch tasks last from milliseconds to hours.
RUN_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)

NODE = Info("filch_node", "This node: name, current node id, executor, API address.")

# -- cluster-wide, refreshed by housekeeping --------------------------------------------
QUEUE_DEPTH = Gauge("filch_queue_depth", "Tasks waiting to be stolen (cluster-wide).")
TASKS = Gauge("filch_tasks", "Tasks in etcd by state (cluster-wide).", ["state"])
ETCD_DB_SIZE = Gauge("filch_etcd_db_size_bytes", "Size of the local etcd member's database.")
ETCD_DB_IN_USE = Gauge("filch_etcd_db_size_in_use_bytes",
                       "Bytes of the local etcd member's database holding live data.")
ETCD_QUOTA = Gauge("filch_etcd_quota_bytes", "The etcd backend quota (NOSPACE past it).")
ETCD_NOSPACE = Gauge("filch_etcd_nospace", "1 while etcd's NOSPACE alarm is raised.")
ETCD_LEADER = Gauge("filch_etcd_is_leader", "1 when the local etcd member is the leader.")
ETCD_HAS_LEADER = Gauge("filch_etcd_has_leader", "1 when the local etcd member sees a leader.")
# Every request this node's etcd client sends, and every watch event it receives: the
# "etcd requests per second per node" of the scaling work (issue 18), which must not grow
# with the queue. maintenance: member status, alarms, compaction, defragmentation.
ETCD_REQUESTS = Counter("filch_etcd_requests_total",
                        "etcd requests this node sent (watch_event: events received), by kind.",
                        ["kind"])
COMPACTIONS = Counter("filch_etcd_compactions_total", "etcd compactions this node ran.")
DEFRAGS = Counter("filch_etcd_defrags_total", "Defragmentations of the local etcd member.")
RETENTION_DELETED = Counter("filch_tasks_deleted_total",
                            "Finished tasks deleted by retention.", ["state"])

# -- stealing ---------------------------------------------------------------------------
STEALS_ATTEMPTED = Counter("filch_steals_attempted_total", "Steal transactions tried.")
STEALS_WON = Counter("filch_steals_won_total", "Steal transactions that took a task.")
STEALS_LOST = Counter("filch_steals_lost_total",
                      "Steal transactions lost to another node (compare failed).")
STEAL_DELAY = Histogram("filch_steal_delay_seconds",
                        "Load-proportional delay waited before a steal.",
                        buckets=LATENCY_BUCKETS)
START_LATENCY = Histogram("filch_task_start_latency_seconds",
                          "From submit to the steal that started an attempt.",
                          buckets=LATENCY_BUCKETS)
# No starvation (node/scheduling/reservation.py).
RESERVATIONS = Gauge("filch_reservations", "1 while this node holds room for a starving task "
                     "(takes no lower-priority work).")
RESERVATION_WAIT = Histogram("filch_reservation_wait_seconds",
                             "From a reservation to the start of its task.",
                             buckets=LATENCY_BUCKETS)

# -- running ----------------------------------------------------------------------------
RUNNING = Gauge("filch_running_tasks", "Attempts running on this node.")
RUN_TIME = Histogram("filch_task_run_seconds", "How long attempts ran on this node.",
                     buckets=RUN_TIME_BUCKETS)
FINISHED = Counter("filch_tasks_finished_total", "Attempts this node finished, by reason.",
                   ["reason"])
FENCED_WRITES = Counter("filch_fenced_writes_total",
                        "Result writes rejected because this node no longer owned the task.")
START_FAILURES = Counter("filch_task_start_failures_total", "Attempts that failed to start.")
NODE_SIDE_START_FAILURES = Counter(
    "filch_node_side_start_failures_total", "Attempts that failed to start for a reason of this "
    "node (task network, /work, runc), not of the task; requeued without spending a retry.")
START_BACKOFF = Gauge("filch_start_backoff", "1 while this node steals nothing after "
                      "node-side start failures in a row (node/scheduling/startfailures.py).")

# -- sandbox steps (node/running/runtime/steps.py) ---------------------------------------------
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                10, 60)
ATTEMPT_STEP = Histogram(
    "filch_attempt_step_seconds",
    "Wall time of each step of a runc attempt on this node: bundle, network (namespace), "
    "work (/work image), run (runc run until exit), teardown, etcd (the end's write).",
    ["step"], buckets=STEP_BUCKETS)
ATTEMPT_STEP_CPU = Counter(
    "filch_attempt_step_cpu_seconds_total",
    "CPU seconds (the agent's and its reaped children's: mkfs, ip, nft, runc) spent during "
    "each step; exact while attempts do not overlap, shared between overlapping ones.",
    ["step"])
WORK_POOL = Gauge("filch_work_pool_images",
                  "Pre-formatted /work images ready for attempts, by size in bytes.", ["size"])

# -- task firewall (node/running/runtime/firewall.py) ---------------------------------------------
FIREWALL_RESTORES = Counter(
    "filch_task_firewall_restores_total",
    "Times this node found its task firewall (nft table) missing or altered and loaded it "
    "again (something ran `nft flush ruleset`).")
FIREWALL_FAILED = Gauge(
    "filch_task_firewall_failed",
    "1 while this node's task firewall cannot be verified or restored: isolated tasks are "
    "refused.")
FIREWALL_ERRORS = Counter(
    "filch_task_firewall_errors_total",
    "Housekeeping rounds whose task firewall step failed (the rest of the round still ran).")

# -- liveness ---------------------------------------------------------------------------
REQUEUES = Counter("filch_requeues_total", "Tasks handed back after losing their node.",
                   ["cause"])
RECOVERY_SWEEPS = Counter("filch_recovery_sweeps_total",
                          "Recovery sweeps this node ran while holding the cluster's "
                          "recovery-sweep claim (one node at a time).")
RECOVERY_READS = Counter("filch_recovery_keys_read_total",
                         "Keys and records recovery read: placed (running-task index keys, "
                         "sweep and node-deletion paths), record (task records, one per "
                         "task it hands back).", ["kind"])
LOST = Counter("filch_tasks_node_lost_total",
               "restart=false tasks ended NODE_LOST because their node was lost.")
KEEPALIVE = Histogram("filch_lease_keepalive_seconds", "Lease renewal round trips.",
                      buckets=LATENCY_BUCKETS)
KEEPALIVE_FAILURES = Counter("filch_lease_keepalive_failures_total",
                             "Lease renewals that failed or timed out.")
SELF_FENCES = Counter("filch_self_fences_total",
                      "Times this node fenced itself after failing to renew its lease.")

# -- capacity ---------------------------------------------------------------------------
CPU_CAPACITY = Gauge("filch_node_cpu_capacity_cores", "CPU cores this node offers.")
MEMORY_CAPACITY = Gauge("filch_node_memory_capacity_bytes", "Memory this node offers.")
CPU_ALLOCATED = Gauge("filch_node_cpu_allocated_cores", "CPU cores allocated to attempts.")
MEMORY_ALLOCATED = Gauge("filch_node_memory_allocated_bytes", "Memory allocated to attempts.")
DISK_CAPACITY = Gauge("filch_node_disk_capacity_bytes",
                      "Disk this node offers to tasks' /work (--disk-capacity or auto).")
DISK_ALLOCATED = Gauge("filch_node_disk_allocated_bytes",
                       "/work sizes of the attempts on this node (enforced sizes only).")
NODE_CORDONED = Gauge("filch_node_cordoned", "1 while this node is cordoned (or draining): "
                      "it steals nothing new.")
NODES_CORDONED = Gauge("filch_nodes_cordoned", "Node names with a cordon (cluster-wide; a "
                       "cordon outlives its node's restarts until `filch node uncordon`).")
CAPABILITY = Gauge("filch_node_capability", "1 for each capability value this node has "
                   "(node/core/capabilities.py), e.g. name=filch.io/disk-enforced value=true.",
                   ["name", "value"])

# -- API --------------------------------------------------------------------------------
API_REQUESTS = Counter("filch_api_requests_total", "gRPC requests by method and status code.",
                       ["method", "code"])
API_LATENCY = Histogram("filch_api_request_duration_seconds", "gRPC request handling time.",
                        ["method"], buckets=LATENCY_BUCKETS)
# Bounded labels: users are made by admins (a handful to hundreds), methods are the API's.
API_REFUSALS = Counter("filch_api_refusals_total",
                       "Calls answered PERMISSION_DENIED, by the calling user and method.",
                       ["user", "method"])
LOG_STREAMS = Gauge("filch_log_streams", "Log streams this node serves now (--max-log-streams).")
EVENT_STREAMS = Gauge("filch_event_streams",
                      "Event streams (Watch, GET /api/v1/events) this node serves now "
                      "(--max-event-streams).")
LOG_COPIES = Counter("filch_log_copies_total",
                     "Copies of ended attempts' logs this node pushed to peers, by result "
                     "(copied, refused, gave_up, dropped: queue full, gone: log already pruned).",
                     ["result"])
# Every result's series exists from start-up on, so a rate over it needs no first event.
for _result in ("copied", "refused", "gave_up", "dropped", "gone"):
    LOG_COPIES.labels(_result)
LOG_COPY_LAG = Histogram("filch_log_copy_lag_seconds",
                         "From an attempt's end to its log copy being readable on a peer.",
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
LOG_COPIES_PENDING = Gauge("filch_log_copies_pending",
                           "Ended attempts whose log copies this node has yet to push.")

# -- batch work (issue 12): holds, dependencies, time limits, retries, fair share
BLOCKED = Gauge("filch_tasks_blocked",
                "PENDING tasks held out of the queue (cluster-wide), by hold: dependencies, "
                "array (submission not complete), retry (back-off).", ["hold"])
DEPENDENCY_RELEASES = Counter("filch_dependency_releases_total",
                              "Held tasks this node released into the queue, by hold.",
                              ["hold"])
DEPENDENCY_FAILURES = Counter("filch_dependency_failures_total",
                              "Tasks this node ended CANCELED DEPENDENCY_FAILED.")
TIMEOUTS = Counter("filch_task_timeouts_total",
                   "Attempts this node stopped at their time limit (TIMED_OUT).")
RETRIES = Counter("filch_task_retries_total",
                  "Attempts this node ended and scheduled for a retry, by failure class.",
                  ["failure_class"])
RETRY_TIMER_HELD = Gauge("filch_retry_timer_held",
                         "Held retries this node's one timer will queue again at their "
                         "not_before (bounded; the resolver sweep releases the rest).")
ARRAY_TASKS_SUBMITTED = Counter("filch_array_tasks_submitted_total",
                                "Tasks created by array submits on this node.")
OWNER_SHARE = Gauge("filch_owner_dominant_share",
                    "Each owner's weighted dominant share of the cluster's CPU and memory, "
                    "as this node's stealer sees it.", ["owner"])
OWNER_RUNNING = Gauge("filch_owner_running_tasks",
                      "Each owner's running tasks across the cluster, as this node sees it.",
                      ["owner"])
OWNER_PICKS = Counter("filch_owner_steals_total",
                      "Tasks this node stole, by owner (fair share in action).", ["owner"])
OWNER_DECAYED_CPU = Gauge("filch_owner_decayed_cpu_seconds",
                          "Each owner's past CPU usage in core-seconds, decayed by the "
                          "cluster's usage-half-life to now (/usage/<owner>).", ["owner"])
OWNER_ORDER = Gauge("filch_owner_order",
                    "What this node's stealer sorts owners of one priority by (lowest "
                    "first): current share mixed with decayed usage, over the weight.",
                    ["owner"])

# Users' quotas (node/scheduling/quotas.py, running_quota.py): each owner's limit and use
# as this node last read them (at a submit or a steal pass of its tasks), and refusals.
OWNER_QUOTA_CPU = Gauge("filch_owner_quota_cpu_millis",
                        "A user's running CPU quota in millicores (owners with one).", ["owner"])
OWNER_RUNNING_CPU = Gauge("filch_owner_running_cpu_millis",
                          "CPU millicores a user's running tasks request, as this node last "
                          "read its charge (owners with a running quota).", ["owner"])
OWNER_QUOTA_MEMORY = Gauge("filch_owner_quota_memory_bytes",
                           "A user's running memory quota in bytes (owners with one).", ["owner"])
OWNER_RUNNING_MEMORY = Gauge("filch_owner_running_memory_bytes",
                             "Memory a user's running tasks request, as this node last read "
                             "its charge (owners with a running quota).", ["owner"])
OWNER_QUOTA_PENDING = Gauge("filch_owner_quota_pending_tasks",
                            "A user's pending-task quota (owners with one).", ["owner"])
OWNER_PENDING = Gauge("filch_owner_pending_tasks",
                      "A user's pending tasks as this node last counted them (at a submit).",
                      ["owner"])
QUOTA_REFUSALS = Counter("filch_quota_refusals_total",
                         "Quota refusals by owner and kind: pending (a submit refused), "
                         "priority (above the ceiling), running (a pass of this node's "
                         "stealer left the owner's tasks queued at its quota).",
                         ["owner", "kind"])

# Label values known in advance are created at import, so every series exists (at 0)
# before it first moves: rate() and alerts then work from the first scrape.
for _cause in ("lease_expired", "scan", "shutdown", "lost_answer"):
    REQUEUES.labels(_cause)
for _kind in ("placed", "record"):
    RECOVERY_READS.labels(_kind)
for _reason in ("EXITED", "OOM_KILLED", "START_FAILED", "TIMED_OUT"):
    FINISHED.labels(_reason)
for _state in ("pending", "running", "complete", "canceled"):
    TASKS.labels(_state)
for _hold in ("dependencies", "array", "retry"):
    BLOCKED.labels(_hold)
    DEPENDENCY_RELEASES.labels(_hold)
for _class in ("failed", "oom", "timeout", "start-failed"):
    RETRIES.labels(_class)
for _kind in ("range", "txn", "put", "lease", "watch_event", "maintenance"):
    ETCD_REQUESTS.labels(_kind)
for _state in ("complete", "canceled"):
    RETENTION_DELETED.labels(_state)
# Every task without --owner is the default owner's (keys.DEFAULT_OWNER), so its series
# is known in advance too: the dashboard's owner panels show data on any cluster.
for _owner_metric in (OWNER_SHARE, OWNER_RUNNING, OWNER_PICKS):
    _owner_metric.labels(DEFAULT_OWNER)
for _owner_gauge in (OWNER_DECAYED_CPU, OWNER_ORDER):
    _owner_gauge.labels(DEFAULT_OWNER)


def serve(listen: str) -> None:
    """Expose /metrics on HOST:PORT (a background thread of prometheus_client)."""
    host, _, port = listen.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0")

BULK_WRITE_LIMIT = Gauge("filch_bulk_write_limit",
                         "Bulk etcd transactions (arrays, releases, cancels) this node lets be "
                         "in flight now: halved while etcd commits slowly (node/etcd/pacing.py).")
BULK_WRITE_PAUSES = Counter("filch_bulk_write_pauses_total",
                            "Pauses of bulk writes because etcd committed slowly even one "
                            "transaction at a time.")

# -- the audit trail (node/faces/audit.py) -------------------------------------------------
AUDIT_ENTRIES = Counter("filch_audit_entries_total",
                        "Audit entries this node wrote, by action (submit, cancel, ...).",
                        ["action"])
AUDIT_WRITE_FAILURES = Counter("filch_audit_write_failures_total",
                               "Audit entries this node could not write (the change they "
                               "describe was made: a failed write never fails the call).")
AUDIT_DELETED = Counter("filch_audit_deleted_total",
                        "Audit entries the retention chore deleted (past audit-retention or "
                        "beyond audit-max-entries).")
