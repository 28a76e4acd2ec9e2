"""Attempts on this node and this node's life in the cluster: runner, results,
recovery, membership and self-fencing, the watchdog, and runtime/ (the only
code that starts task processes).

May import: node.scheduling (the node's registration and capacity ledger),
node.etcd, node.core. The watchdog imports runtime.kill and the standard
library only.
"""
