"""Large specs do not break batches (issue 10, item 4): submits, steals, finishes, listings
and the recovery sweep all stay within etcd's request limit and the channels' limits."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import limits
from tests.e2e.cluster import Cluster

TASKS = 20
# execve takes at most 128 KiB per string (MAX_ARG_STRLEN): ~900 KB of environment is
# nine variables of 100,000 bytes each.
VARIABLES = 9
VARIABLE_BYTES = 100_000
# Bounds on the background `filch ls` loop: it runs while the tasks do, never forever.
LS_MAX_RUNS = 300


def _large_spec(index: int) -> pb.TaskSpec:
    env = {f"BIG{n}": chr(ord("a") + (index + n) % 26) * VARIABLE_BYTES
           for n in range(VARIABLES)}
    # The task checks that its whole environment arrived.
    check = " && ".join(f'[ ${{#BIG{n}}} -eq {VARIABLE_BYTES} ]' for n in range(VARIABLES))
    return pb.TaskSpec(name=f"large-{index}", command="sh", args=["-c", check], env=env)


def test_twenty_large_specs_queued_at_once_all_complete(three_nodes: Cluster) -> None:
    specs = [_large_spec(index) for index in range(TASKS)]
    assert all(900_000 <= spec.ByteSize() <= limits.MAX_SPEC_BYTES for spec in specs)

    failures: list[str] = []
    runs = 0
    stop = threading.Event()

    def list_throughout() -> None:
        nonlocal runs
        while not stop.is_set() and runs < LS_MAX_RUNS:
            runs += 1
            result = three_nodes.cli("ls", index=runs % 3, timeout=30)
            if result.returncode != 0:
                failures.append(f"`filch ls` exited {result.returncode}: {result.stderr}")

    lister = threading.Thread(target=list_throughout)
    lister.start()
    try:
        # All at once, spread over the nodes: group commit, the 64-candidate read and the
        # steal and finish batches all see many large records together.
        with ThreadPoolExecutor(TASKS) as pool:
            responses = list(pool.map(
                lambda item: three_nodes.stub(item[0] % 3).Submit(
                    pb.SubmitRequest(spec=item[1]), timeout=30),
                enumerate(specs)))
        ids = [response.task.id for response in responses]
        listed = three_nodes.stub(1).ListTasks(pb.ListTasksRequest(page_size=1000), timeout=30)
        assert listed.tasks and listed.ByteSize() <= limits.LIST_PAGE_BYTES + 64 * 1024
        tasks = three_nodes.wait_finished(ids, timeout=180)
    finally:
        stop.set()
        lister.join(timeout=60)
    assert not failures, failures[:3]
    assert runs > 0
    assert all(task.state == pb.TASK_STATE_COMPLETE and task.reason == pb.REASON_EXITED
               and task.exit_code == 0 for task in tasks), [
        (task.id, pb.Reason.Name(task.reason), task.exit_code, task.message) for task in tasks]

    # Every page of every listing, followed to its end, holds each task exactly once.
    for state in (pb.TASK_STATE_UNSPECIFIED, pb.TASK_STATE_COMPLETE):
        seen: list[str] = []
        token = ""
        for _ in range(TASKS + 1):
            page = three_nodes.stub(2).ListTasks(
                pb.ListTasksRequest(state=state, page_size=1000, page_token=token), timeout=30)
            assert page.ByteSize() <= limits.LIST_PAGE_BYTES + 64 * 1024
            seen += [task.id for task in page.tasks]
            token = page.next_page_token
            if not token:
                break
        assert sorted(set(seen) & set(ids)) == sorted(ids)
        assert len(seen) == len(set(seen))
    result = three_nodes.cli("ls", timeout=30)
    assert result.returncode == 0, result.stderr
    assert sum(task_id[:8] in result.stdout for task_id in ids) == TASKS

