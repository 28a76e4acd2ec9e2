"""Which task runs where and when: the queue view, stealing, fair share, capacity,
admission, dependencies and holds, arrays, paging.

May import: node.etcd, node.core.
"""
