"""A task's TCP probe, shared by the unit and e2e firewall tests: run inside a task as
`python3 -c TCP_PROBE HOST:PORT ...`; it tries a connection to every target at once (1.5 s
each, so a dropped packet costs one timeout, not one per target) and prints one JSON object
{target: "open" | the error's name}. Standard library only: a task sees the host's /usr.
"""

TCP_PROBE = """
import json, socket, sys, threading
result = {}
def probe(target):
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1.5).close()
        result[target] = "open"
    except OSError as exc:
        result[target] = type(exc).__name__
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(result))
"""
