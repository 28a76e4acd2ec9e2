"""Releasing dependents, once, by one node (node/scheduling/dependencies.py), with its race
windows held open by failpoints: the end's writer dies before its mark, the release's
lock holder dies after its first batch, a child arrives while its parent's release runs.
And the scale check: an array of 2,000 waiting for an array of 2,000."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.scheduling.dependencies import DEPENDENCY_PAGE
from tests.e2e.cluster import Cluster, wait_for
from tests.e2e.conftest import require_tools

# How long a failpoint holds its window: far longer than the test needs to act in it.
HOLD = 60
# Children of the lock-holder test: more than one page of a release pass
# (dependencies.DEPENDENCY_PAGE), so the holder dies with some released and some not.
CHILDREN = DEPENDENCY_PAGE + 200
SCALE = 2000


def after(parent: str, kind: int = pb.DEPENDENCY_KIND_SUCCESS) -> list[pb.Dependency]:
    return [pb.Dependency(id=parent, kind=kind)]


def kill_agent(cluster: Cluster, index: int) -> None:
    process = cluster.nodes[index].process
    assert process is not None
    process.kill()          # the agent only (SIGKILL): its etcd member lives on
    process.wait()


def logged(cluster: Cluster, text: str) -> list[int]:
    """The live nodes whose log says text."""
    return [index for index in cluster.alive() if text in cluster.nodes[index].log_text()]


def array_tasks(cluster: Cluster, array_id: str, count: int) -> list[pb.Task]:
    tasks: list[pb.Task] = []
    token = ""
    while True:
        page = cluster.any_stub().ListTasks(pb.ListTasksRequest(
            array_id=array_id, page_size=1000, page_token=token), timeout=30)
        tasks += page.tasks
        token = page.next_page_token
        if not token:
            break
    assert len(tasks) == count
    return tasks


@pytest.mark.timeout(120)
def test_children_are_released_when_the_ends_writer_dies_before_its_mark(
        tmp_path: Path) -> None:
    require_tools()
    with Cluster(tmp_path, size=3, executor="process",
                 env={"FILCH_FAILPOINTS": f"store.before_mark=1*sleep({HOLD})"}) as cluster:
        parent = cluster.submit("true")
        child = cluster.submit("true", after=after(parent))
        writer = wait_for("the end's writer to stop before its mark",
                          lambda: logged(cluster, "failpoint store.before_mark"), timeout=30)[0]
        assert cluster.get(parent).state == pb.TASK_STATE_COMPLETE
        kill_agent(cluster, writer)
        done = cluster.wait_finished([child], timeout=60)[0]
        assert done.reason == pb.REASON_EXITED and done.exit_code == 0 and done.attempt == 1
        wait_for("the flag and the mark to go",
                 lambda: not any(key.startswith(("/release/", "/dependents/"))
                                 for key in cluster.etcd_keys()), timeout=30)


@pytest.mark.timeout(180)
def test_another_node_finishes_a_release_whose_holder_died(tmp_path: Path) -> None:
    require_tools()
    with Cluster(tmp_path, size=3, executor="process", cpus=4,
                 env={"FILCH_FAILPOINTS": "resolver.after_batch=1*sleep(8)"}) as cluster:
        parent = cluster.submit("sh", "-c", "sleep 2")
        array = cluster.stub().Submit(pb.SubmitRequest(
            spec=pb.TaskSpec(command="true", cpu_millis=1000, after=after(parent)),
            array=pb.ArraySpec(start=1, end=CHILDREN)), timeout=30)
        holder = wait_for("a release to stop after its first batch",
                          lambda: logged(cluster, "failpoint resolver.after_batch"), timeout=60)[0]
        kill_agent(cluster, holder)
        tasks = cluster.wait_finished(list(array.task_ids), timeout=120)
        assert all(task.reason == pb.REASON_EXITED and task.exit_code == 0
                   for task in tasks), [task for task in tasks if task.exit_code][:1]
        # A child the dead node was running is requeued (restart=true): that is recovery,
        # at most one per slot of that node (cpus=4, a task takes 1 cpu). A child released
        # twice would run twice beyond that.
        again = [task.id for task in tasks if task.attempt != 1]
        assert len(again) <= 4, f"children ran more than once: {again}"
        parent_end = cluster.get(parent).finished_at.ToNanoseconds()
        assert all(task.started_at.ToNanoseconds() >= parent_end for task in tasks)
        assert logged(cluster, "failpoint resolver.after_batch"), \
            "no other node resumed the release"
        wait_for("the mark, the flag and the lock to go",
                 lambda: not [key for key in cluster.etcd_keys() if key.startswith(
                     ("/release/", "/dependents/", "/dep/", "/lock/release"))], timeout=30)


@pytest.mark.timeout(120)
def test_a_child_submitted_while_its_parents_release_runs_is_not_stranded(
        tmp_path: Path) -> None:
    require_tools()
    with Cluster(tmp_path, size=2, executor="process",
                 env={"FILCH_FAILPOINTS": f"resolver.before_end=1*sleep({HOLD // 4})"}
                 ) as cluster:
        other = cluster.submit("sh", "-c", "sleep 6")
        parent = cluster.submit("true")
        first = cluster.submit("true", after=after(parent))
        wait_for("the release to stop before deleting its flag",
                 lambda: logged(cluster, "failpoint resolver.before_end"), timeout=30)
        # Waits for the ended parent and a running task: its /dep/ key and the parent's
        # flag are written now, while the pass is about to delete that flag.
        late = cluster.submit("true", after=after(parent) + after(other))
        assert cluster.get(late).hold == pb.HOLD_DEPENDENCIES
        done = cluster.wait_finished([first, other, late], timeout=60)
        assert all(task.reason == pb.REASON_EXITED and task.exit_code == 0 for task in done)
        assert done[2].attempt == 1


@pytest.mark.timeout(420)
def test_an_array_of_2000_waiting_for_an_array_of_2000(tmp_path: Path) -> None:
    """Released within 30 s of the parent array's last end (printed: the figure)."""
    require_tools()
    with Cluster(tmp_path, size=3, executor="process", cpus=8) as cluster:
        parents = cluster.stub().Submit(pb.SubmitRequest(
            spec=pb.TaskSpec(command="true"), array=pb.ArraySpec(start=1, end=SCALE)),
            timeout=60)
        children = cluster.stub().Submit(pb.SubmitRequest(
            spec=pb.TaskSpec(command="true", after=[pb.Dependency(
                id=parents.array_id, kind=pb.DEPENDENCY_KIND_ARRAY)]),
            array=pb.ArraySpec(start=1, end=SCALE)), timeout=60)

        def parents_done() -> float | None:
            tasks = array_tasks(cluster, parents.array_id, SCALE)
            if not all(task.state == pb.TASK_STATE_COMPLETE for task in tasks):
                return None
            return max(task.finished_at.ToNanoseconds() / 1e9 for task in tasks)

        last_end = wait_for("the parent array to finish", parents_done, timeout=300,
                            interval=1)

        def released() -> float | None:
            tasks = array_tasks(cluster, children.array_id, SCALE)
            if any(task.state == pb.TASK_STATE_PENDING and task.hold != pb.HOLD_NONE
                   for task in tasks):
                return None
            return time.time()

        seen = wait_for("every child to leave its hold", released, timeout=120, interval=0.5)
        print(f"\nrelease of {SCALE} children: none held {seen - last_end:.2f} s after the "
              "parent array's last end")
        done = wait_for("the children to finish", lambda: all(
            task.state == pb.TASK_STATE_COMPLETE
            for task in array_tasks(cluster, children.array_id, SCALE)), timeout=300,
                        interval=1)
        tasks = array_tasks(cluster, children.array_id, SCALE)
        assert done and all(task.exit_code == 0 and task.attempt == 1 for task in tasks)
        assert min(task.started_at.ToNanoseconds() / 1e9 for task in tasks) >= last_end
        assert seen - last_end < 30
