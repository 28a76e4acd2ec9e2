"""Checks on everything a client sends, before anything is written.

Each check raises InvalidArgument naming the field, with a message a person can act on.
"""

from __future__ import annotations

import math
import posixpath
import re

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, labels
from node.core.errors import InvalidArgument
from node.core.lifecycle import RETRY_CLASSES
from node.core.limits import (
    MAX_ARGS,
    MAX_ARRAY_TASKS,
    MAX_CPU_MILLIS,
    MAX_DEPENDENCIES,
    MAX_DISK_BYTES,
    MAX_ENV,
    MAX_MEMORY_BYTES,
    MAX_NAME,
    MAX_PAGE_SIZE,
    MAX_REQUEST_ID,
    MAX_SPEC_BYTES,
    MIN_DISK_BYTES,
    MIN_MEMORY_BYTES,
)
from node.core.units import MAX_DURATION_SECONDS

# Retries one task may ask for: beyond this a task is broken, not unlucky; each attempt
# also stays in the record's history.
MAX_RETRIES = 100

# Back-off base when a spec asks for retries without one (the default).
DEFAULT_RETRY_BACKOFF_SECONDS = 1.0

# Array indices stay below this (Slurm's MaxArraySize is 1001 by default, at most 4
# million): larger numbers are typos, and FILCH_ARRAY_INDEX stays a short number.
MAX_ARRAY_INDEX = 10_000_000

# Defaults when a spec leaves cpu or memory at 0 (Nomad's are 100 MHz / 300 MB; a batch
# task on filch is usually smaller, and a limit that is too low shows up as OOM_KILLED).
DEFAULT_CPU_MILLIS = 100
DEFAULT_MEMORY_BYTES = 128 * 1024 * 1024

DEFAULT_PAGE_SIZE = 100

# A task's network modes (spec.network; node/running/runtime/network.py builds them). Named
# here, with the rest of what a spec may hold, so that checking a spec needs no runtime code.
ISOLATED, NONE, HOST = "isolated", "none", "host"
NETWORK_MODES = (ISOLATED, NONE, HOST)

# Environment variable names: POSIX's portable set. The process executor restores a
# task's environment with a shell after dropping root (see node/running/runtime/process.py), and
# a shell can export nothing else; other programs' conventions agree.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _text(field: str, value: str, *, limit: int) -> None:
    if "\0" in value:
        raise InvalidArgument(field, "must not contain NUL bytes")
    if len(value) > limit:
        raise InvalidArgument(field, f"is {len(value)} characters long; the limit is {limit}")


def task_id(value: str, field: str = "id") -> str:
    """A well-formed task id, or InvalidArgument."""
    if not value:
        raise InvalidArgument(field, "is required (a task id as printed by `filch submit`)")
    if not keys.is_id(value):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgument(field, f"{shown!r} is not a task id (lowercase UUID, "
                                     "e.g. 01a21bce-b194-7000-994b-fef8376138b8)")
    return value


def spec(raw: pb.TaskSpec) -> pb.TaskSpec:
    """A copy of the spec with defaults filled in, or InvalidArgument for the first bad field."""
    size = raw.ByteSize()
    if size > MAX_SPEC_BYTES:
        raise InvalidArgument("spec", f"is {size} bytes; the limit is {MAX_SPEC_BYTES} "
                                      "(put large inputs in files, not in the command line)")
    if not raw.command.strip():
        raise InvalidArgument("spec.command", "is required: the program to run")
    _text("spec.command", raw.command, limit=4096)
    _text("spec.name", raw.name, limit=MAX_NAME)
    _text("spec.workdir", raw.workdir, limit=4096)
    if raw.workdir and not raw.workdir.startswith("/"):
        raise InvalidArgument("spec.workdir", f"{raw.workdir!r} must be an absolute path")
    _check_workdir(raw.workdir)
    if len(raw.args) > MAX_ARGS:
        raise InvalidArgument("spec.args", f"has {len(raw.args)} entries; the limit is {MAX_ARGS}")
    for index, arg in enumerate(raw.args):
        _text(f"spec.args[{index}]", arg, limit=MAX_SPEC_BYTES)
    if len(raw.env) > MAX_ENV:
        raise InvalidArgument("spec.env", f"has {len(raw.env)} entries; the limit is {MAX_ENV}")
    for name, value in raw.env.items():
        if not ENV_NAME.fullmatch(name):
            shown = name if len(name) <= 64 else name[:64] + "..."
            raise InvalidArgument("spec.env", f"{shown!r} is not a valid variable name (letters, "
                                              "digits and _, not starting with a digit)")
        _text(f"spec.env[{name}]", value, limit=MAX_SPEC_BYTES)
    if raw.cpu_millis < 0 or raw.cpu_millis > MAX_CPU_MILLIS:
        raise InvalidArgument("spec.cpu_millis", f"{raw.cpu_millis} is outside 1..{MAX_CPU_MILLIS} "
                                                 "millicores (1000 = one core)")
    if raw.memory_bytes < 0 or raw.memory_bytes > MAX_MEMORY_BYTES:
        raise InvalidArgument("spec.memory_bytes", f"{raw.memory_bytes} is outside "
                                                   f"{MIN_MEMORY_BYTES}..{MAX_MEMORY_BYTES} bytes")
    if 0 < raw.memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument("spec.memory_bytes", f"{raw.memory_bytes} bytes is too small; "
                                                   f"at least {MIN_MEMORY_BYTES} (4Mi)")
    disk_bytes(raw.disk_bytes, "spec.disk_bytes")
    network = raw.network or ISOLATED
    if network not in NETWORK_MODES:
        shown = raw.network[:32]
        raise InvalidArgument("spec.network", f"{shown!r} is not one of "
                                              f"{', '.join(NETWORK_MODES)}")
    _dependencies(raw)
    _seconds("spec.time_limit_seconds", raw.time_limit_seconds)
    _seconds("spec.retry_backoff_seconds", raw.retry_backoff_seconds)
    if raw.retries > MAX_RETRIES:
        raise InvalidArgument("spec.retries", f"{raw.retries} is above the limit of "
                                              f"{MAX_RETRIES}")
    for name in raw.retry_on:
        if name not in RETRY_CLASSES:
            raise InvalidArgument("spec.retry_on", f"{name[:32]!r} is not one of "
                                                   f"{', '.join(RETRY_CLASSES)}")
    if not keys.MIN_PRIORITY <= raw.priority <= keys.MAX_PRIORITY:
        raise InvalidArgument("spec.priority", f"{raw.priority} is outside "
                                               f"{keys.MIN_PRIORITY}..{keys.MAX_PRIORITY}")
    owner(raw.owner or keys.DEFAULT_OWNER, "spec.owner")
    try:
        labels.parse_constraints(raw.constraints)
    except InvalidArgument as exc:
        raise InvalidArgument("spec.constraints", exc.detail) from None
    clean = pb.TaskSpec()
    clean.CopyFrom(raw)
    clean.network = network
    clean.owner = raw.owner or keys.DEFAULT_OWNER
    # One entry per parent, in the order given (a parent named twice is waited for once).
    unique = {parent.id: parent.kind or pb.DEPENDENCY_KIND_SUCCESS for parent in raw.after}
    del clean.after[:]
    clean.after.extend(pb.Dependency(id=parent_id, kind=kind)
                       for parent_id, kind in unique.items())
    # Every class when retries are asked for without naming any (a Kubernetes Job's
    # backoffLimit also counts every failure); the order is the table's.
    classes = set(raw.retry_on) or (set(RETRY_CLASSES) if raw.retries else set())
    del clean.retry_on[:]
    clean.retry_on.extend(name for name in RETRY_CLASSES if name in classes)
    if raw.retries and not raw.retry_backoff_seconds:
        clean.retry_backoff_seconds = DEFAULT_RETRY_BACKOFF_SECONDS
    clean.cpu_millis = raw.cpu_millis or DEFAULT_CPU_MILLIS
    clean.memory_bytes = raw.memory_bytes or DEFAULT_MEMORY_BYTES
    # Restartable unless the client says otherwise: losing a node should not lose work.
    clean.restart = raw.restart if raw.HasField("restart") else True
    return clean


def _dependencies(raw: pb.TaskSpec) -> None:
    if len(raw.after) > MAX_DEPENDENCIES:
        raise InvalidArgument("spec.after", f"has {len(raw.after)} entries; the limit is "
                                            f"{MAX_DEPENDENCIES} (depend on an array instead "
                                            "of its tasks: --after-array)")
    kinds: dict[str, int] = {}
    for parent in raw.after:
        task_id(parent.id, "spec.after")
        if parent.kind not in pb.DependencyKind.values():
            raise InvalidArgument("spec.after", f"{parent.kind} is not a DependencyKind")
        kind = parent.kind or pb.DEPENDENCY_KIND_SUCCESS
        if kinds.setdefault(parent.id, kind) != kind:
            raise InvalidArgument("spec.after", f"{parent.id} is named with two different "
                                                "kinds (--after and --after-any); give one")


def _seconds(field: str, value: float) -> None:
    if not math.isfinite(value) or not 0 <= value <= MAX_DURATION_SECONDS:
        raise InvalidArgument(field, f"{value} is outside 0..{MAX_DURATION_SECONDS} seconds "
                                     "(30 days; 0 means none)")


def owner(value: str, field: str = "owner") -> str:
    """An owner name (fair share), or InvalidArgument naming field."""
    if not keys.OWNER_PATTERN.fullmatch(value):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidArgument(field, f"{shown!r} is not an owner name (1-64 letters, digits, "
                                     "'.', '_', '@' or '-', starting with a letter or digit)")
    return value


def array(raw: pb.ArraySpec) -> pb.ArraySpec:
    """An array's index range with the step filled in, or InvalidArgument naming `array`."""
    step = raw.step or 1
    if step < 1:
        raise InvalidArgument("array", f"step {raw.step} must be at least 1")
    if not 0 <= raw.start <= raw.end < MAX_ARRAY_INDEX:
        raise InvalidArgument("array", f"{raw.start}-{raw.end} is not a range of indices "
                                       f"with 0 <= START <= END < {MAX_ARRAY_INDEX}")
    count = (raw.end - raw.start) // step + 1
    if count > MAX_ARRAY_TASKS:
        raise InvalidArgument("array", f"{raw.start}-{raw.end}:{step} makes {count} tasks; "
                                       f"one submit makes at most {MAX_ARRAY_TASKS}")
    return pb.ArraySpec(start=raw.start, end=raw.end, step=step)


def disk_bytes(value: int, field: str) -> int:
    """A /work size limit (0: the node's default), or InvalidArgument naming field."""
    if value != 0 and not MIN_DISK_BYTES <= value <= MAX_DISK_BYTES:
        raise InvalidArgument(field, f"{value} is outside {MIN_DISK_BYTES}..{MAX_DISK_BYTES} "
                                     "bytes (1Mi..1Pi; 0 means the node's default)")
    return value


def request_id(value: str) -> str:
    _text("request_id", value, limit=MAX_REQUEST_ID)
    return value


def page_size(value: int) -> int:
    if value > MAX_PAGE_SIZE:
        raise InvalidArgument("page_size", f"{value} is above the limit of {MAX_PAGE_SIZE}")
    return value or DEFAULT_PAGE_SIZE


def state_filter(value: int) -> int:
    if value not in pb.TaskState.values():
        raise InvalidArgument("state", f"{value} is not a TaskState")
    return value


# Kernel interfaces, not directories to work in: a task started in /proc/<pid> or /sys
# works on the host's process and device tables through relative paths.
KERNEL_FILESYSTEMS = ("/proc", "/sys")


def _check_workdir(workdir: str) -> None:
    """Refuse a workdir under /proc or /sys, however it is spelled (//proc, /tmp/../sys)."""
    if not workdir:
        return
    # posixpath.normpath keeps a leading "//" (POSIX leaves it implementation-defined);
    # Linux treats it as "/".
    normal = posixpath.normpath("/" + workdir.lstrip("/"))
    for root in KERNEL_FILESYSTEMS:
        if normal == root or normal.startswith(root + "/"):
            raise InvalidArgument("spec.workdir", f"{workdir!r} is under {root}, a kernel "
                                  "interface, not a directory to work in; use /work or "
                                  "another path")
