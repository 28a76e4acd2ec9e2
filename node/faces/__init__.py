"""What users and other nodes talk to: the gRPC servicer and the API logic behind
it, log streaming, the HTTP face (WSGI app, gunicorn settings, web UI), and
rendering for the CLI and HTTP.

May import: node.client, node.operations, node.running, node.scheduling,
node.etcd, node.core; never the etcd client itself.
"""
