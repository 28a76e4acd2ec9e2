"""The executor and task network a node's config asks for (runc isolates; the process
executor does not), and where their state lives on the machine."""

from __future__ import annotations

import os
from pathlib import Path

from node.core.config import Config
from node.core.errors import ExecutorError
from node.running import disk
from node.running.runtime.base import Executor
from node.running.runtime.cgroups import ProcessCgroups
from node.running.runtime.network import TaskNetwork
from node.running.watchdog import Watchdog


def make_network(config: Config) -> TaskNetwork | None:
    """The task network of a runc node (the process executor does not isolate networks)."""
    if config.executor != "runc":
        return None
    return TaskNetwork(node_name=config.name, task_subnet=config.task_subnet,
                       state_dir=config.path / "network",
                       task_deny=config.task_deny, task_allow=config.task_allow)


def make_executor(config: Config, watchdog: Watchdog,
                  network: TaskNetwork | None = None, disk_reserve: int = 0) -> Executor:
    """The executor the config asks for (runc isolates; process does not).

    Raises ExecutorError when the process executor cannot give each task a cgroup and
    allow_unisolated_tasks is off (the CLI refused that already: node/running/isolation.py).
    """
    if config.executor == "runc":
        from node.running.runtime.runc import RuncExecutor
        return RuncExecutor(runc_binary=config.runc_binary, state_root=runc_root(config),
                            task_uid=config.task_uid,
                            attempts_root=disk.attempts_root(config), network=network,
                            disk_reserve=disk_reserve)
    from node.running.runtime.process import ProcessExecutor
    cgroups = process_cgroups(config)
    if not cgroups.usable():
        if not config.allow_unisolated_tasks:
            raise ExecutorError("the process executor cannot give each task a cgroup (not "
                                "root, or no writable cgroup hierarchy): refusing to run "
                                "tasks; pass --allow-unisolated-tasks to run them anyway")
        return ProcessExecutor(task_uid=config.task_uid if os.geteuid() == 0 else None,
                               watchdog=watchdog)
    return ProcessExecutor(task_uid=config.task_uid if os.geteuid() == 0 else None,
                           watchdog=watchdog, cgroups=cgroups)


def process_cgroups(config: Config) -> ProcessCgroups:
    """Where the process executor's attempt cgroups live (the watchdog kills there)."""
    return ProcessCgroups.for_node(config.name)


def runc_root(config: Config) -> Path:
    """runc's state directory for this node's containers (the watchdog kills what is there)."""
    return config.path / "runc"
