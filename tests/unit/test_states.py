"""The one definition of final states and of the state names people type."""

from __future__ import annotations

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import states


def test_only_complete_and_canceled_are_final() -> None:
    assert states.FINISHED == {pb.TASK_STATE_COMPLETE, pb.TASK_STATE_CANCELED}
    assert not states.is_finished(pb.Task(state=pb.TASK_STATE_RUNNING))
    assert states.is_finished(pb.Task(state=pb.TASK_STATE_CANCELED))


def test_every_state_has_a_typed_name() -> None:
    named = set(states.STATE_BY_NAME.values())
    assert named == set(pb.TaskState.values()) - {pb.TASK_STATE_UNSPECIFIED}
