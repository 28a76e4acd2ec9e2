"""Who may do what (node/faces/access.py), and the user service and store against a real
etcd: users submit as themselves, see others' tasks without their command, act on their
own tasks only; users are added once, changed field by field, listed without token
hashes, and removing one cancels its pending tasks but not its running ones."""

from __future__ import annotations

import pytest

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys, metrics
from node.core.errors import Conflict, InvalidArgument, NotStarted, PermissionDenied
from node.core.identity import Identity, acting_as
from node.etcd.store import Store
from node.etcd.users import UserDirectory, token_hash
from node.faces import access
from node.faces.service import TaskService
from node.faces.users import TOKEN_PREFIX, UserService
from node.scheduling.conditions import DependencyCheck
from tests.unit.etcd_fixture import require_etcd

require_etcd()

ALICE = Identity("alice", "user")
ADMIN_USER = Identity("root-ish", "admin")


def _task(owner: str) -> pb.Task:
    return pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                   spec=pb.TaskSpec(command="secret-cmd", args=["--key", "k"], env={"A": "1"},
                                    workdir="/w", owner=owner, cpu_millis=500))


def test_a_user_submits_as_itself_and_another_owner_is_refused() -> None:
    with acting_as(ALICE):
        spec = pb.TaskSpec(command="true")
        access.submit_owner(spec)
        assert spec.owner == "alice"
        access.submit_owner(spec)   # its own name, given: fine
        before = metrics.API_REFUSALS.labels("alice", "Submit")._value.get()
        with pytest.raises(PermissionDenied, match="alice may not submit as owner bob"):
            access.submit_owner(pb.TaskSpec(command="true", owner="bob"))
        assert metrics.API_REFUSALS.labels("alice", "Submit")._value.get() == before + 1
    for admin in (ADMIN_USER, Identity("admin", "admin", cluster_token=True)):
        with acting_as(admin):
            spec = pb.TaskSpec(command="true", owner="bob")
            access.submit_owner(spec)
            assert spec.owner == "bob"
            empty = pb.TaskSpec(command="true")
            access.submit_owner(empty)
            assert empty.owner == ""    # the default owner, as before users


def test_others_tasks_are_redacted_for_users_only() -> None:
    own, other, default = _task("alice"), _task("bob"), _task("")
    with acting_as(ALICE):
        access.redact([own, other, default])
    assert own.spec.command == "secret-cmd" and not own.redacted
    for task in (other, default):
        assert task.redacted and task.spec.command == "" and not task.spec.args
        assert not task.spec.env and task.spec.workdir == ""
        assert task.spec.cpu_millis == 500      # resources stay visible (as squeue)
    shown = _task("bob")
    with acting_as(ADMIN_USER):
        access.redact([shown])
    assert shown.spec.command == "secret-cmd" and not shown.redacted


def test_admin_and_cluster_token_checks() -> None:
    with acting_as(ALICE):
        with pytest.raises(PermissionDenied, match="alice may not cordon nodes"):
            access.require_admin("CordonNode", "cordon nodes")
        with pytest.raises(PermissionDenied):
            access.require_own("Cancel", _task("bob"), "cancel")
        access.require_own("Cancel", _task("alice"), "cancel")
    with acting_as(ADMIN_USER):
        access.require_admin("CordonNode", "cordon nodes")
        # An admin user's own token is no node's credential.
        with pytest.raises(PermissionDenied, match="only nodes of the cluster"):
            access.require_cluster_token("PutLogCopy", "store log copies")
    with acting_as(Identity("admin", "admin", cluster_token=True)):
        access.require_cluster_token("PutLogCopy", "store log copies")


def _service(store: Store, *, open_node: bool = False) -> UserService:
    return UserService(tasks=TaskService(store=store, check=DependencyCheck(store=store)),
                       open_node=open_node)


async def test_users_are_added_once_changed_by_field_and_listed_without_hashes(
        store: Store) -> None:
    users = _service(store)
    made = await users.add(pb.AddUserRequest(name="alice", quota=pb.Quota(max_pending=5)))
    assert made.token.startswith(TOKEN_PREFIX) and made.user.token_hash == ""
    assert made.user.role == pb.ROLE_USER
    stored = await store.get_user("alice")
    assert stored is not None and stored.user.token_hash == token_hash(made.token)
    directory = UserDirectory()
    await directory.relist(store)
    assert directory.by_token(made.token) is not None
    with pytest.raises(Conflict, match="user alice exists"):
        await users.add(pb.AddUserRequest(name="alice"))
    for bad in ("admin", "a/b", ""):
        with pytest.raises(InvalidArgument, match=r"^name:"):
            await users.add(pb.AddUserRequest(name=bad))
    changed = await users.set(pb.SetUserRequest(
        name="alice", quota=pb.Quota(max_cpu_millis=2000, max_priority=3),
        fields=["max_cpu", "max_priority"]))
    assert changed.quota.max_cpu_millis == 2000 and changed.quota.max_priority == 3
    assert changed.quota.max_pending == 5       # not named: unchanged
    cleared = await users.set(pb.SetUserRequest(name="alice", fields=["max_priority"]))
    assert not cleared.quota.HasField("max_priority")
    rotated = await users.rotate(pb.RotateUserTokenRequest(name="alice", expires_seconds=60))
    await directory.relist(store)
    assert directory.by_token(made.token) is None and directory.by_token(rotated.token)
    assert rotated.user.HasField("token_expires_at")
    listed = (await users.list()).users
    assert [user.name for user in listed] == ["alice"] and listed[0].token_hash == ""


async def test_an_open_node_gives_no_user_tokens(store: Store) -> None:
    with pytest.raises(NotStarted, match="filch certs"):
        await _service(store, open_node=True).add(pb.AddUserRequest(name="alice"))
    assert await store.get_user("alice") is None


async def test_removing_a_user_cancels_its_pending_tasks_not_its_running_ones(
        store: Store) -> None:
    users = _service(store)
    await users.add(pb.AddUserRequest(name="carol"))
    queued = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true", owner="carol"))
    accounted = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING, accounted=True,
                        hold=pb.HOLD_RETRY, spec=pb.TaskSpec(command="true", owner="carol"))
    running = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_RUNNING, node_id="n1",
                      spec=pb.TaskSpec(command="true", owner="carol"))
    others = pb.Task(id=keys.new_task_id(), state=pb.TASK_STATE_PENDING,
                     spec=pb.TaskSpec(command="true", owner="carolyn"))
    for task in (queued, accounted, running, others):
        assert await store.transition(None, task) is not None
    removed = await users.remove(pb.RemoveUserRequest(name="carol"))
    assert removed.canceled == 2
    for task in (queued, accounted):
        found = await store.get_task(task.id)
        assert found is not None and found.task.state == pb.TASK_STATE_CANCELED
        assert found.task.message == "canceled: user carol was removed"
    for task in (running, others):
        found = await store.get_task(task.id)
        assert found is not None and found.task.state == task.state
    assert await store.get_user("carol") is None
    assert await store.count(keys.pending_of("carol")) == 0
