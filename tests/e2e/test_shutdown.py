"""SIGTERM closes the door first: a steal already sent when the drain begins is awaited
and its task drained like every other attempt, never lost with the node's lease."""

from __future__ import annotations

from pathlib import Path

from node._gen.filch.v1 import filch_pb2 as pb
from tests.e2e.cluster import Cluster, Node, wait_for
from tests.e2e.conftest import require_tools

# How long the failpoint holds a committed steal before its attempt is launched: the
# test sends SIGTERM inside it.
STEAL_HOLD = 3.0


def test_a_steal_in_flight_at_sigterm_runs_its_no_restart_task(tmp_path: Path) -> None:
    """The window: a steal committed, its answer held at stealer.after_commit, when the
    node gets SIGTERM. The drain used to snapshot the attempts before that steal launched
    its task, revoke the lease and exit: the task, stolen but never started, was recovered
    from the dead lease and (restart=false) ended NODE_LOST without having run.

    Three members so that the others keep a quorum when the stealing node leaves (the
    task may run on this node before it stops, or on another)."""
    require_tools()
    hold = f"stealer.after_commit=1*sleep({STEAL_HOLD:g})"
    with Cluster(tmp_path, size=3, env={"FILCH_FAILPOINTS": hold}) as cluster:
        task_id = cluster.submit("sh", "-c", "echo ran", restart=False)

        def holding() -> Node | None:
            return next((node for node in cluster.nodes if
                         "failpoint stealer.after_commit: sleep" in node.log_text()), None)

        victim = wait_for("a steal held at stealer.after_commit", holding, timeout=30,
                          interval=0.05)
        assert victim.process is not None
        victim.process.terminate()
        assert victim.process.wait(timeout=60) == 0, victim.log_tail()

        task, = cluster.wait_finished([task_id], timeout=60)
        assert (task.state, task.reason, task.exit_code) == (
            pb.TASK_STATE_COMPLETE, pb.REASON_EXITED, 0), task
        assert task.attempt >= 1 and task.HasField("started_at"), task
        if task.node_name != victim.name:
            # (The log of an attempt on the stopped node is on its disk, out of reach.)
            assert cluster.cli("logs", task_id, index=cluster.first_alive(),
                               check=True).stdout == "ran\n"
