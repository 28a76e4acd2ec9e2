"""A node's view of the priority index /queue/<rank>/<owner>/<id>: the candidates the
stealer chooses from, grouped by (priority, owner), within a group by this node's place in
each task's order of nodes (node/scheduling/ranking.py) and then oldest first, and the
etcd revision up to which the view is complete.

A relist reads the groups' marks, then one bounded range per group read in windows of
the id space, so a queue of a million tasks costs a few short ranges, not a walk over the
queue; watch events keep the view current. The
revision lets a steal compare that no higher-priority key appeared unseen since.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator

from node._gen.filch.v1 import filch_pb2 as pb
from node.core import keys
from node.etcd.store import Store, WatchEvent
from node.scheduling.ranking import MAX_RANK

Group = tuple[int, str]


def group_of(task: pb.Task) -> Group:
    """The queue group (priority, owner) a task is queued in."""
    return task.spec.priority, task.spec.owner or keys.DEFAULT_OWNER
"""(priority, owner): one run of the priority index, oldest task first."""

# How many keys one relist reads of each group before it skips to the next: plenty to
# keep every node busy until the watch or the next relist brings more.
GROUP_READ = 256
# Ranges one relist reads at most: owners times priorities in use, with room to spare.
# Groups past it (the lowest priorities) wait for the watch or a shallower queue.
MAX_RELIST_RANGES = 256
# Ids one group holds at most: the watch adds every new key, and a queue of a million must
# not become a million ids in every node's memory. Keys past it (the group's youngest) wait
# for a relist once the group runs low, as those a relist cut short do.
MAX_GROUP_VIEW = 4 * GROUP_READ
# A group the relist cut short is read again once this few of its candidates are left.
REFILL_BELOW = GROUP_READ // 4

# Ready tasks every node may try (past MAX_RANK) that a pass looks at: among them each node
# takes those its own score prefers, so nodes reach for different ones.
OPEN_SAMPLE = 64

# How long the queue watch must have been quiet before its last event's revision counts
# as handled whole (one transaction's keys arrive as consecutive events; until then the
# view counts as complete up to the revision before).
SETTLE_SECONDS = 0.02


class GroupIds:
    """One group's ids by this node's rank for them (0 .. MAX_RANK), each oldest first,
    with the moment this node first saw them (monotonic)."""

    __slots__ = ("buckets", "size")

    def __init__(self) -> None:
        self.buckets: list[dict[str, float]] = [{} for _ in range(MAX_RANK + 1)]
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self.buckets)

    def __contains__(self, task_id: object) -> bool:
        return any(task_id in bucket for bucket in self.buckets)

    def pop(self, task_id: str) -> bool:
        for bucket in self.buckets:
            if bucket.pop(task_id, None) is not None:
                self.size -= 1
                return True
        return False


class QueueView:
    """Queued task ids by group, kept from a bounded relist and the queue watch."""

    def __init__(self, *, rank: Callable[[str], int] = lambda task_id: 0) -> None:
        """rank: this node's place in a task's order of nodes (0 = first; MAX_RANK or
        more: after every node may try it)."""
        self._rank = rank
        # Per group, ids by rank, each insertion-ordered: oldest first (ids are UUIDv7, and
        # the watch delivers keys in creation order; a requeued task goes to the back).
        self.groups: dict[Group, GroupIds] = {}
        self.never_fits: set[str] = set()
        """Ids this node can never run (too large): left out until they leave the queue."""
        self.truncated: set[Group] = set()
        """Groups the last relist read only in part."""
        self.refill = asyncio.Event()
        """Set when a group read in part runs low: relist soon."""
        self.watching_all = True
        """Whether the watch feeding on_event covers every shard: only then do its events
        make the view complete beyond the last relist."""
        self._complete = 0
        self._last_event_revision = 0
        self._last_event_at = 0.0

    async def relist(self, store: Store) -> None:
        """Read the groups' marks (keys.GROUPS: one short range), then the first GROUP_READ
        keys of each group (at most MAX_RELIST_RANGES groups), each read in windows of the
        id space (Store.first_ids), so that neither costs etcd a walk over the whole queue
        (etcd 3.4 walks a range before it applies the limit). A group found empty loses its
        mark. Raises what Store raises."""
        marks = await store.list_page(keys.GROUPS, keys.prefix_end(keys.GROUPS),
                                      limit=MAX_RELIST_RANGES)
        truncated: set[Group] = set()
        for mark in marks.keys:
            group = keys.parse_group_mark(mark)
            found = await store.first_ids(keys.queue_group(*group), limit=GROUP_READ)
            for key in found:
                self.add(group, keys.parse_queue(key)[2])
            if len(found) >= GROUP_READ:
                truncated.add(group)
            elif not found:
                await store.forget_group(mark)
        self.truncated = truncated
        # Every queue key that existed at the marks' revision is in a group whose mark was
        # read (the same transaction put both; a mark goes only with its group empty), and
        # was read (or belongs to a group read in part): the view is complete up to there.
        # Events of earlier revisions still on their way only repeat what the reads showed.
        self._complete = max(self._complete, marks.revision)

    def ids(self, group: Group) -> list[str]:
        """The group's ids (by rank, then oldest first)."""
        return list(self.groups.get(group, ()))

    def add(self, group: Group, task_id: str, seen: float | None = None) -> int | None:
        """Hold task_id; returns this node's rank for it, None when it was held already or
        is left out (never fits here, or the group holds MAX_GROUP_VIEW)."""
        if task_id in self.never_fits:
            return None
        ids = self.groups.setdefault(group, GroupIds())
        if task_id in ids:
            return None
        if len(ids) >= MAX_GROUP_VIEW:
            self.truncated.add(group)
            return None
        rank = min(MAX_RANK, self._rank(task_id))
        ids.buckets[rank][task_id] = time.monotonic() if seen is None else seen
        ids.size += 1
        return rank

    def forget(self, group: Group, task_id: str) -> None:
        ids = self.groups.get(group)
        if ids is None:
            return
        ids.pop(task_id)
        if len(ids) < REFILL_BELOW and group in self.truncated:
            self.truncated.discard(group)
            self.refill.set()
        if not ids:
            del self.groups[group]

    def rerank(self) -> None:
        """The order of nodes changed (a node joined or left): sort every id again, keeping
        when it was first seen."""
        for group, ids in list(self.groups.items()):
            held = sorted(((seen, task_id) for bucket in ids.buckets
                           for task_id, seen in bucket.items()))
            del self.groups[group]
            for seen, task_id in held:
                self.add(group, task_id, seen)

    def on_event(self, event: WatchEvent) -> int | None:
        """Apply one watch event (of the shard index, or of the priority index); this
        node's rank for a task it added, else None."""
        if event.revision > self._last_event_revision and self.watching_all:
            # Events arrive in revision order: every one before this revision is handled.
            self._complete = max(self._complete, self._last_event_revision)
            self._last_event_revision = event.revision
        self._last_event_at = time.monotonic()
        parse = keys.parse_shard_queue if event.key.startswith(keys.SHARDS) else keys.parse_queue
        priority, owner, task_id = parse(event.key)
        if event.deleted:
            self.forget((priority, owner), task_id)
            self.never_fits.discard(task_id)
            return None
        return self.add((priority, owner), task_id)

    def complete_revision(self) -> int:
        """The revision up to which this view holds every queue key written."""
        if (self._last_event_revision > self._complete
                and time.monotonic() - self._last_event_at >= SETTLE_SECONDS):
            self._complete = self._last_event_revision
        return self._complete

    def reads(self, *, per_group: int, per_read: int, now: float, step: float,
              score: Callable[[str], int]) -> tuple[list[list[tuple[Group, str]]], float | None]:
        """Candidates to read, read by read, highest priority first: whole priorities at a
        time (so that fair share sees every owner of one; a read passes per_read only to
        finish a priority), per group the per_group this node may try now: a task of rank
        r once `r * step` passed since this node saw it, lower ranks first, then oldest;
        past MAX_RANK by score among the OPEN_SAMPLE oldest. A priority that still holds a
        task this node may not try yet ends the reads: no lower task is taken while a
        higher one waits for its first nodes. Also returns when the earliest task held
        back becomes this node's to try (None: none is held back)."""
        chunks: list[list[tuple[Group, str]]] = []
        chunk: list[tuple[Group, str]] = []
        next_ready: float | None = None
        ordered = sorted(self.groups, key=lambda group: (-group[0], group[1]))
        for _, same in itertools.groupby(ordered, key=lambda group: group[0]):
            if len(chunk) >= per_read:
                chunks.append(chunk)
                chunk = []
            held_back = False
            for group in same:
                picked: list[str] = []
                for rank, bucket in enumerate(self.groups[group].buckets):
                    ready: list[str] = []
                    limit = OPEN_SAMPLE if rank == MAX_RANK else per_group - len(picked)
                    for task_id, seen in bucket.items():
                        if len(ready) >= limit:
                            break
                        if seen + rank * step > now:
                            held_back = True
                            at = seen + rank * step
                            next_ready = at if next_ready is None else min(next_ready, at)
                            break
                        ready.append(task_id)
                    if rank == MAX_RANK:
                        ready.sort(key=score)
                    picked += ready[:per_group - len(picked)]
                    if len(picked) >= per_group:
                        break
                chunk += [(group, task_id) for task_id in picked]
            if held_back:
                break
        if chunk:
            chunks.append(chunk)
        return chunks, next_ready


async def mark_groups(store: Store) -> int:
    """Put the mark of every group of the priority index that lacks one (a skip scan of
    /queue/: one read per group, each walking the rest of the queue in etcd 3.4, so it is
    for one node now and then: the counts chore). Queue keys written by an agent older than
    the marks (an upgrade, a rolling one too) are found by relists from then on. Returns
    how many marks were put. Raises what Store raises."""
    start, end = keys.QUEUE, keys.prefix_end(keys.QUEUE)
    put = 0
    for _ in range(MAX_RELIST_RANGES):
        page = await store.list_page(start, end, limit=1)
        if not page.keys:
            break
        priority, owner, _ = keys.parse_queue(page.keys[0])
        put += await store.ensure_group_mark(keys.group_mark(priority, owner))
        start = keys.prefix_end(keys.queue_group(priority, owner))
    return put
