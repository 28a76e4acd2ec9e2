"""A node's view of the priority index /queue/<rank>/<owner>/<id>: the candidates the
stealer chooses from, grouped by (priority, owner), oldest first, and the etcd revision up
to which the view is complete.

A relist reads one bounded range per group (a skip scan), so a queue of 100,000 tasks
costs a few short ranges, not a full scan; watch events keep the view current. The
revision lets a steal compare that no higher-priority key appeared unseen since.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator

from node.core import keys
from node.etcd.store import Store, WatchEvent

Group = tuple[int, str]
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

# How long the queue watch must have been quiet before its last event's revision counts
# as handled whole (one transaction's keys arrive as consecutive events; until then the
# view counts as complete up to the revision before).
SETTLE_SECONDS = 0.02


class QueueView:
    """Queued task ids by group, kept from a bounded relist and the queue watch."""

    def __init__(self) -> None:
        # Per group an insertion-ordered set of ids: oldest first (ids are UUIDv7, and the
        # watch delivers keys in creation order; a requeued task goes to the back).
        self.groups: dict[Group, dict[str, None]] = {}
        self.first_seen: dict[str, float] = {}
        """When this node first saw each id (monotonic): a task's rank delays count from it."""
        self.never_fits: set[str] = set()
        """Ids this node can never run (too large): left out until they leave the queue."""
        self.truncated: set[Group] = set()
        """Groups the last relist read only in part."""
        self.refill = asyncio.Event()
        """Set when a group read in part runs low: relist soon."""
        self._complete = 0
        self._last_event_revision = 0
        self._last_event_at = 0.0

    async def relist(self, store: Store) -> None:
        """Read the priority index: after GROUP_READ keys of a group, jump to the next
        group; at most MAX_RELIST_RANGES ranges. Raises what Store raises."""
        start, end = keys.QUEUE, keys.prefix_end(keys.QUEUE)
        first_revision = 0
        truncated: set[Group] = set()
        for _ in range(MAX_RELIST_RANGES):
            page = await store.list_page(start, end, limit=GROUP_READ)
            first_revision = first_revision or page.revision
            for key in page.keys:
                priority, owner, task_id = keys.parse_queue(key)
                self.add((priority, owner), task_id)
            if not page.more or not page.keys:
                break
            # The last group of a full page may go on: skip the rest of it.
            priority, owner, _ = keys.parse_queue(page.keys[-1])
            truncated.add((priority, owner))
            start = keys.prefix_end(keys.queue_group(priority, owner))
        self.truncated = truncated
        # Every key that existed at the first range's revision was read (or belongs to a
        # group read in part): the view is complete up to there. Events of earlier
        # revisions still on their way only repeat what the ranges showed.
        self._complete = max(self._complete, first_revision)

    def add(self, group: Group, task_id: str) -> None:
        if task_id in self.never_fits:
            return
        ids = self.groups.setdefault(group, {})
        if len(ids) >= MAX_GROUP_VIEW and task_id not in ids:
            self.truncated.add(group)
            return
        ids[task_id] = None
        self.first_seen.setdefault(task_id, time.monotonic())

    def forget(self, group: Group, task_id: str) -> None:
        ids = self.groups.get(group)
        if ids is None:
            return
        ids.pop(task_id, None)
        self.first_seen.pop(task_id, None)
        if len(ids) < REFILL_BELOW and group in self.truncated:
            self.truncated.discard(group)
            self.refill.set()
        if not ids:
            del self.groups[group]

    def on_event(self, event: WatchEvent) -> bool:
        """Apply one watch event; True when it added a candidate."""
        if event.revision > self._last_event_revision:
            # Events arrive in revision order: every one before this revision is handled.
            self._complete = max(self._complete, self._last_event_revision)
            self._last_event_revision = event.revision
        self._last_event_at = time.monotonic()
        priority, owner, task_id = keys.parse_queue(event.key)
        if event.deleted:
            self.forget((priority, owner), task_id)
            self.never_fits.discard(task_id)
            return False
        self.add((priority, owner), task_id)
        return True

    def complete_revision(self) -> int:
        """The revision up to which this view holds every queue key written."""
        if (self._last_event_revision > self._complete
                and time.monotonic() - self._last_event_at >= SETTLE_SECONDS):
            self._complete = self._last_event_revision
        return self._complete

    def reads(self, *, per_group: int, per_read: int) -> Iterator[list[tuple[Group, str]]]:
        """Candidates to read, read by read, highest priority first: whole priorities at a
        time (so that fair share sees every owner of one; a read passes per_read only to
        finish a priority), the oldest per_group of each group."""
        chunk: list[tuple[Group, str]] = []
        ordered = sorted(self.groups, key=lambda group: (-group[0], group[1]))
        for _, same in itertools.groupby(ordered, key=lambda group: group[0]):
            if len(chunk) >= per_read:
                yield chunk
                chunk = []
            for group in same:
                chunk += [(group, task_id) for task_id in
                          itertools.islice(self.groups.get(group, ()), per_group)]
        if chunk:
            yield chunk
