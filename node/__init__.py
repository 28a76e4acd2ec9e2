"""filch: a peer-to-peer batch task scheduler on etcd and runc."""
