"""The vocabulary every layer shares: errors, configuration, limits, units, the etcd
key schema, lifecycle records, input checks, metrics, TLS credentials.

May import: node._gen (the generated protobuf code), the standard library and third-party
libraries; no other node package, and never aetcd.
"""
