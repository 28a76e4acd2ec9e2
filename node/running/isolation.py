"""Whether this node may run tasks the way its configuration asks: the one rule that
decides, at start-up, between isolated tasks, an explicit opt-out and a refusal.

Fail closed (see the README's threat model): nothing picks a weaker executor by itself.
runc needs root and the runc binary. The process executor does not isolate: on a node
with certificates or a token (a cluster meant to keep tasks out of its secrets) it
needs --allow-unisolated-tasks, and so it does wherever it cannot give each task a
cgroup to be killed by (not root, no writable hierarchy). A non-root agent also runs its
tasks under its own uid, which can read the node's keys and token and signal the agent.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from node.core.config import Config
from node.running.runtime.cgroups import ProcessCgroups

# How the flag is spelled in every message.
FLAG = "--allow-unisolated-tasks (FILCH_ALLOW_UNISOLATED_TASKS=1)"


@dataclass(frozen=True)
class Host:
    """What the machine offers, probed once (injected by unit tests)."""

    euid: int
    runc_found: bool
    cgroups: bool
    """The process executor can give each task a cgroup (root, a writable hierarchy)."""

    @classmethod
    def probe(cls, config: Config) -> Host:
        """Look at this machine. Creates the process executor's cgroup parents when that
        executor is configured."""
        cgroups = (config.executor == "process"
                   and ProcessCgroups.for_node(config.name).usable())
        return cls(os.geteuid(), shutil.which(config.runc_binary) is not None, cgroups)


def refusal(config: Config, host: Host) -> str | None:
    """Why this node must not start (one line naming the fix), or None when it may."""
    secured = bool(config.tls_ca or config.api_token_file)
    if config.executor == "runc":
        if host.euid == 0 and host.runc_found:
            return None
        missing = " and ".join(what for what, ok in (("root", host.euid == 0),
                                                    (f"{config.runc_binary!r}",
                                                     host.runc_found)) if not ok)
        hint = (f" and {FLAG}, which gives the tasks this node's keys and network"
                if secured else "")
        return (f"executor: runc (the default) isolates tasks but needs root and runc, and "
                f"this agent lacks {missing}: run it as root with runc installed, or pass "
                f"--executor process{hint} to run tasks NOT isolated")
    if config.allow_unisolated_tasks:
        return None
    if secured:
        exposed = ("the host network, reaching etcd and every node's API"
                   if host.euid == 0 else
                   "this agent's uid, reading its TLS key, etcd key and API token, and the "
                   "host network")
        return (f"executor: process with certificates or a token: tasks would share "
                f"{exposed}; run the agent as root with the runc executor, or pass {FLAG} "
                "to accept that (UNSAFE)")
    if not host.cgroups:
        why = "not root" if host.euid != 0 else "no writable cgroup hierarchy"
        return (f"executor: process cannot give each task a cgroup here ({why}), so a task "
                f"that calls setsid would outlive its cancel and the agent; pass {FLAG} to "
                "run tasks anyway, contained by process groups only (UNSAFE)")
    return None


def warnings(config: Config, host: Host) -> list[str]:
    """What an allowed, unsafe configuration gives up (for the log)."""
    if config.executor != "process" or not config.allow_unisolated_tasks:
        return []
    found = []
    if config.tls_ca or config.api_token_file:
        found.append("--allow-unisolated-tasks: tasks of this TLS node share its network "
                     "(etcd, every node's API are in reach)")
    if host.euid != 0:
        found.append("--allow-unisolated-tasks: tasks run as this agent's uid and can read "
                     "its keys and token and signal it")
    if not host.cgroups:
        found.append("--allow-unisolated-tasks: no cgroup per task: setsid escapes a cancel")
    return found
