"""Checks on what a client sends: defaults, and an InvalidArgument naming each bad field."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, limits, validation
from node.core.errors import InvalidArgument

MiB = 1024 * 1024
TASK_ID = "01a21bce-b194-7000-994b-fef8376138b8"


def invalid(call: Any, *args: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        call(*args)
    error = caught.value
    assert str(error).startswith(error.field + ": "), "the message names the field first"
    return error


# -- spec(): defaults --------------------------------------------------------------------


def test_spec_fills_defaults() -> None:
    clean = validation.spec(pb.TaskSpec(command="/bin/true"))
    assert clean.cpu_millis == 100
    assert clean.memory_bytes == 128 * MiB
    assert clean.HasField("restart") and clean.restart is True
    assert clean.command == "/bin/true"


def test_spec_keeps_restart_false_when_explicit() -> None:
    clean = validation.spec(pb.TaskSpec(command="/bin/true", restart=False))
    assert clean.HasField("restart") and clean.restart is False


def test_spec_keeps_given_values_and_does_not_touch_the_request() -> None:
    raw = pb.TaskSpec(name="train", command="/usr/bin/python3", args=["-c", "print(1)"],
                      env={"HOME": "/tmp"}, workdir="/work", cpu_millis=2500,
                      memory_bytes=4 * MiB, restart=True, network="none", owner="alice",
                      priority=7, time_limit_seconds=90, retries=2, retry_on=["failed"],
                      retry_backoff_seconds=3,
                      after=[pb.Dependency(id=PARENT, kind=pb.DEPENDENCY_KIND_ANY)])
    before = raw.SerializeToString()
    clean = validation.spec(raw)
    assert raw.SerializeToString() == before
    assert clean == raw
    assert clean is not raw


def test_spec_fills_in_the_batch_defaults() -> None:
    clean = validation.spec(pb.TaskSpec(command="x", retries=2,
                                        after=[pb.Dependency(id=PARENT),
                                               pb.Dependency(id=PARENT)]))
    assert clean.owner == "default"
    assert list(clean.retry_on) == ["failed", "oom", "timeout", "start-failed"]
    assert clean.retry_backoff_seconds == 1.0
    assert list(clean.after) == [pb.Dependency(id=PARENT, kind=pb.DEPENDENCY_KIND_SUCCESS)]
    plain = validation.spec(pb.TaskSpec(command="x"))
    assert (list(plain.retry_on), plain.retry_backoff_seconds) == ([], 0)


@pytest.mark.parametrize(("start", "end", "step"), [(5, 4, 1), (0, 10_000_000, 1),
                                                    (0, 100_000, 1), (0, 3, -1)])
def test_array_refuses_bad_ranges(start: int, end: int, step: int) -> None:
    assert invalid(validation.array, pb.ArraySpec(start=start, end=end, step=step)).field == "array"


def test_array_fills_in_the_step_and_takes_100000() -> None:
    assert validation.array(pb.ArraySpec(start=1, end=100_000)) == pb.ArraySpec(
        start=1, end=100_000, step=1)


def test_spec_accepts_the_boundaries() -> None:
    validation.spec(pb.TaskSpec(command="x", cpu_millis=1, memory_bytes=4 * MiB))
    validation.spec(pb.TaskSpec(command="x", cpu_millis=limits.MAX_CPU_MILLIS,
                                memory_bytes=limits.MAX_MEMORY_BYTES))
    validation.spec(pb.TaskSpec(command="x", args=[""] * limits.MAX_ARGS))
    validation.spec(pb.TaskSpec(command="x", name="n" * limits.MAX_NAME))


# -- spec(): one bad field each ----------------------------------------------------------

PARENT = "01a21bce-b194-7000-994b-fef8376138b8"

BAD_SPECS: list[tuple[str, dict[str, Any], str]] = [
    ("empty command", {"command": ""}, "spec.command"),
    ("whitespace command", {"command": " \t\n "}, "spec.command"),
    ("NUL in command", {"command": "/bin/\0sh"}, "spec.command"),
    ("NUL in args", {"args": ["ok", "a\0b"]}, "spec.args[1]"),
    ("NUL in env value", {"env": {"PATH": "/bin\0"}}, "spec.env[PATH]"),
    ("NUL in env name", {"env": {"A\0B": "x"}}, "spec.env"),
    ("NUL in name", {"name": "a\0"}, "spec.name"),
    ("NUL in workdir", {"workdir": "/tmp/\0"}, "spec.workdir"),
    ("env name with =", {"env": {"A=B": "x"}}, "spec.env"),
    ("empty env name", {"env": {"": "x"}}, "spec.env"),
    # Only portable shell names: the process executor exports them from sh.
    ("env name with -", {"env": {"MY-VAR": "x"}}, "spec.env"),
    ("env name with a space", {"env": {"LD PRELOAD": "x"}}, "spec.env"),
    ("env name with a newline", {"env": {"A\nLD_PRELOAD": "x"}}, "spec.env"),
    ("env name starting with a digit", {"env": {"1A": "x"}}, "spec.env"),
    ("env name with a dot", {"env": {"a.b": "x"}}, "spec.env"),
    ("non-ASCII env name", {"env": {"\u00e9T\u00c9": "x"}}, "spec.env"),
    ("env name with a quote", {"env": {"A'$(id)'": "x"}}, "spec.env"),
    ("relative workdir", {"workdir": "work/dir"}, "spec.workdir"),
    ("dot workdir", {"workdir": "./x"}, "spec.workdir"),
    # Kernel interfaces, however spelled: a task there works on the host's tables.
    ("workdir /proc", {"workdir": "/proc"}, "spec.workdir"),
    ("workdir /proc/1", {"workdir": "/proc/1/"}, "spec.workdir"),
    ("workdir //proc", {"workdir": "//proc/self"}, "spec.workdir"),
    ("workdir ..-escaped /sys", {"workdir": "/tmp/../sys/kernel"}, "spec.workdir"),
    ("workdir /./sys", {"workdir": "/./sys//fs/cgroup"}, "spec.workdir"),
    ("negative cpu", {"cpu_millis": -1}, "spec.cpu_millis"),
    ("huge cpu", {"cpu_millis": limits.MAX_CPU_MILLIS + 1}, "spec.cpu_millis"),
    ("int64 cpu", {"cpu_millis": 2**63 - 1}, "spec.cpu_millis"),
    ("negative memory", {"memory_bytes": -1}, "spec.memory_bytes"),
    ("huge memory", {"memory_bytes": limits.MAX_MEMORY_BYTES + 1}, "spec.memory_bytes"),
    ("memory below 4 MiB", {"memory_bytes": 4 * MiB - 1}, "spec.memory_bytes"),
    ("memory of one byte", {"memory_bytes": 1}, "spec.memory_bytes"),
    ("negative disk", {"disk_bytes": -1}, "spec.disk_bytes"),
    ("disk of one byte", {"disk_bytes": 1}, "spec.disk_bytes"),
    ("huge disk", {"disk_bytes": limits.MAX_DISK_BYTES + 1}, "spec.disk_bytes"),
    ("long name", {"name": "n" * (limits.MAX_NAME + 1)}, "spec.name"),
    ("too many args", {"args": [""] * (limits.MAX_ARGS + 1)}, "spec.args"),
    ("too many env", {"env": {f"V{i}": "" for i in range(limits.MAX_ENV + 1)}}, "spec.env"),
    ("spec over 1 MiB", {"args": ["x" * limits.MAX_SPEC_BYTES]}, "spec"),
    ("bad parent id", {"after": [pb.Dependency(id="../x")]}, "spec.after"),
    ("parent with two kinds", {"after": [pb.Dependency(id=PARENT),
                                         pb.Dependency(id=PARENT, kind=2)]}, "spec.after"),
    ("unknown dependency kind", {"after": [pb.Dependency(id=PARENT, kind=9)]}, "spec.after"),
    ("too many parents", {"after": [pb.Dependency(id=PARENT[:-3] + f"{i:03x}")
                                    for i in range(limits.MAX_DEPENDENCIES + 1)]}, "spec.after"),
    ("negative time limit", {"time_limit_seconds": -1}, "spec.time_limit_seconds"),
    ("NaN time limit", {"time_limit_seconds": float("nan")}, "spec.time_limit_seconds"),
    ("year-long time limit", {"time_limit_seconds": 366 * 86400}, "spec.time_limit_seconds"),
    ("infinite back-off", {"retry_backoff_seconds": float("inf")}, "spec.retry_backoff_seconds"),
    ("too many retries", {"retries": 101}, "spec.retries"),
    ("unknown retry class", {"retry_on": ["segfault"]}, "spec.retry_on"),
    ("priority above 1000", {"priority": 1001}, "spec.priority"),
    ("priority below -1000", {"priority": -1001}, "spec.priority"),
    ("owner with a slash", {"owner": "a/b"}, "spec.owner"),
    ("owner with a newline", {"owner": "a\nb"}, "spec.owner"),
    ("long owner", {"owner": "o" * 65}, "spec.owner"),
]


@pytest.mark.parametrize(("fields", "field"), [(fields, field) for _, fields, field in BAD_SPECS],
                         ids=[name for name, _, _ in BAD_SPECS])
def test_spec_rejects_a_bad_field_naming_it(fields: dict[str, Any], field: str) -> None:
    raw = pb.TaskSpec(**{"command": "/bin/true", **fields})
    assert invalid(validation.spec, raw).field == field


def test_spec_reports_the_limit_in_the_message() -> None:
    error = invalid(validation.spec, pb.TaskSpec(command="x", memory_bytes=1024))
    assert "4Mi" in str(error)


# -- spec(): property --------------------------------------------------------------------

INT64 = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 999, 4 * MiB - 1, 4 * MiB, limits.MAX_CPU_MILLIS,
                     limits.MAX_CPU_MILLIS + 1, limits.MAX_MEMORY_BYTES,
                     limits.MAX_MEMORY_BYTES + 1]),
)
TEXT = st.one_of(st.text(max_size=40),
                 st.sampled_from(["", " ", "\t", "\0", "a\0b", "/", "/tmp", "rel/ative", "A=B",
                                  "\u00e9", "x" * 300]))


@st.composite
def task_specs(draw: st.DrawFn) -> pb.TaskSpec:
    raw = pb.TaskSpec(
        name=draw(TEXT), command=draw(TEXT), args=draw(st.lists(TEXT, max_size=5)),
        env=draw(st.dictionaries(TEXT, TEXT, max_size=4)), workdir=draw(TEXT),
        cpu_millis=draw(INT64), memory_bytes=draw(INT64))
    restart = draw(st.sampled_from([None, True, False]))
    if restart is not None:
        raw.restart = restart
    return raw


@settings(max_examples=300, deadline=None)
@given(task_specs())
def test_spec_returns_a_spec_in_bounds_or_raises_invalid_argument(raw: pb.TaskSpec) -> None:
    try:
        clean = validation.spec(raw)
    except InvalidArgument as error:
        assert error.field == "spec" or error.field.startswith("spec.")
        return
    assert 1 <= clean.cpu_millis <= limits.MAX_CPU_MILLIS
    assert limits.MIN_MEMORY_BYTES <= clean.memory_bytes <= limits.MAX_MEMORY_BYTES
    assert clean.HasField("restart")
    assert clean.restart == (raw.restart if raw.HasField("restart") else True)
    assert clean.command.strip()
    assert clean.workdir == "" or clean.workdir.startswith("/")
    assert len(clean.name) <= limits.MAX_NAME
    texts = [clean.command, clean.name, clean.workdir, *clean.args, *clean.env, *clean.env.values()]
    assert not any("\0" in text for text in texts)
    assert all(validation.ENV_NAME.fullmatch(name) for name in clean.env)
    assert raw.ByteSize() <= limits.MAX_SPEC_BYTES
    # Validating a stored spec again changes nothing (submit compares specs on retry).
    assert validation.spec(clean) == clean


# -- ids, pages, filters -----------------------------------------------------------------


def test_task_id_accepts_a_task_id() -> None:
    assert validation.task_id(TASK_ID) == TASK_ID
    generated = keys.new_task_id()
    assert validation.task_id(generated) == generated


@pytest.mark.parametrize("value", ["", "../x", TASK_ID.upper(), TASK_ID[:-1] + "\0",
                                   "/task/status", TASK_ID + "/..", "not-an-id"])
def test_task_id_rejects_malformed_ids(value: str) -> None:
    assert invalid(validation.task_id, value).field == "id"


def test_task_id_names_the_field_it_is_given() -> None:
    assert invalid(validation.task_id, "nope", "task.id").field == "task.id"


def test_task_id_does_not_echo_a_huge_value() -> None:
    error = invalid(validation.task_id, "a" * 100_000)
    assert len(str(error)) < 300


def test_request_id_limits() -> None:
    assert validation.request_id("r" * limits.MAX_REQUEST_ID) == "r" * 128
    assert validation.request_id("") == ""
    assert invalid(validation.request_id, "r" * 129).field == "request_id"
    assert invalid(validation.request_id, "a\0").field == "request_id"


@pytest.mark.parametrize(("given_size", "used"), [(0, 100), (1, 1), (100, 100), (1000, 1000)])
def test_page_size_defaults_and_keeps_sizes_within_the_limit(given_size: int, used: int) -> None:
    assert validation.page_size(given_size) == used


@pytest.mark.parametrize("given_size", [1001, 10**9])
def test_page_size_rejects_sizes_over_the_limit(given_size: int) -> None:
    assert invalid(validation.page_size, given_size).field == "page_size"


@pytest.mark.parametrize("state", [pb.TASK_STATE_UNSPECIFIED, pb.TASK_STATE_PENDING,
                                   pb.TASK_STATE_RUNNING, pb.TASK_STATE_COMPLETE,
                                   pb.TASK_STATE_CANCELED])
def test_state_filter_accepts_every_task_state(state: int) -> None:
    assert validation.state_filter(state) == state


@pytest.mark.parametrize("state", [5, 99, -1])
def test_state_filter_rejects_unknown_enum_numbers(state: int) -> None:
    assert invalid(validation.state_filter, state).field == "state"


def test_network_defaults_to_isolated_and_accepts_the_three_modes() -> None:
    assert validation.spec(pb.TaskSpec(command="true")).network == "isolated"
    for mode in ("isolated", "none", "host"):
        assert validation.spec(pb.TaskSpec(command="true", network=mode)).network == mode


@pytest.mark.parametrize("mode", ["bridge", "HOST", "host ", "none;rm", "\0"])
def test_unknown_network_mode_is_refused_naming_the_field(mode: str) -> None:
    with pytest.raises(InvalidArgument, match=r"spec\.network"):
        validation.spec(pb.TaskSpec(command="true", network=mode))


@pytest.mark.parametrize("workdir", ["/processes", "/proc2", "/system/sys", "/work/proc"])
def test_workdirs_that_only_look_like_proc_or_sys_are_accepted(workdir: str) -> None:
    assert validation.spec(pb.TaskSpec(command="x", workdir=workdir)).workdir == workdir
