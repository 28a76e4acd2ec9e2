"""etcd access: the only code that talks to etcd (store, connection, error mapping) and
the typed transactions every lifecycle arrow is made of (txn, group commit,
handback), the list-then-watch loop, failpoints (they fake etcd's failures).

May import: node.core. The only package that imports aetcd.
"""
