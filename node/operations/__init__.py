"""Keeping the cluster healthy: housekeeping (retention, compaction, defrag,
NOSPACE), certificates, the embedded etcd member and its rejoin.

May import: node.scheduling, node.etcd, node.core (the runner and stealer
only through the Protocols housekeeping declares).
"""
