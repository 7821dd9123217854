"""Portal leases: several `throttled serve` instances on one database, each portal owned by one
instance at a time (see "Scaling out" in the architecture notes).

An instance owns a portal through a lease row that its heartbeat renews every third of
`cluster.lease_s`; once a lease expires unrenewed (its owner died or lost the database),
another instance takes the portal over. Portals that need an owner are spread across the live
instances: each takes up to its fair share (portals with work or leased, divided by the live
instances, rounded up), and one holding more hands the excess back when another has room. A
stopping instance hands every portal back at once. Joining, handing back and stopping are
announced by NOTIFY, so the others act at once instead of at their next heartbeat.

Lease times are the database's, so skewed clocks do not matter. Locally a lease counts only
until the instant its renewal was sent + lease_s - a third of lease_s: an instance that
stalls, or cannot reach the database, stops sending for its portals before another can take
them over.

The owner (the scheduler) sets `on_gained` (portals taken, with their previous owners: their
claimed rows are to be reset and their rate log replayed) and `on_lost` (portals to stop
sending for, at once). `on_gained` may be called again for a portal whose previous call
raised; neither may call back into acquire() or stop().

Work stored at an instance for a portal it does not own goes to route(): portals nobody owns
are acquired there and then, and the owners of the others are told in one notification
(queue ids grouped by portal), which their listener hands to `on_work` (queue ids of portals
it owns, and portals to look at in full when the notification had no room for their queues).

An instance that loses the database stops starting requests at once (suspend(): its
listening connection was closed, a heartbeat or a result write found the database gone), not
only once its leases lapse here: what it sends then could not be recorded, and the next owner
would send it again. The next heartbeat that renews the leases resumes sending.

An instance that dies leaves its leases to expire. At a start, the leases of instances on the
same host (named hostname:pid, the default) whose process no longer exists end at once: a
restart after a crash takes its portals back without waiting out lease_s. (Instances that share
a host name must then share its process table: containers that share a host name, each in its
own pid namespace, set cluster.instance_name.)

The parts: cluster_leases.py holds the state of the leases and what the scheduler asks of it,
cluster_listen.py the listener and the work notifications' format; this module the life cycle,
taking and handing back portals, and the heartbeat.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import socket
from collections.abc import Collection, Iterable, Mapping

import structlog

from throttled.aio import Outage, wait_event
from throttled.cluster_listen import Listener, decimal_id, work_payload
from throttled.config import MAX_INSTANCE_NAME
from throttled.db.cluster import Survey
from throttled.db.repository import DatabaseError, DatabaseUnavailable

log = structlog.get_logger(__name__)

LOGGED_PORTALS = 20  # portal ids a log line names (it counts them all)


def _some(portals: Iterable[int]) -> list[int]:
    return sorted(portals)[:LOGGED_PORTALS]


class Cluster(Listener):
    """This instance's portal leases: which portals it may send for, kept by heartbeat."""

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Register this instance (the others are told), end the leases of dead instances of
        this host, and take a first look at the cluster."""
        async with self._lock:
            await self._register()
            await self._end_dead()
            self._note(await self._db(self._repo.survey(self.id, self.lease_s)))

    async def beat_once(self) -> None:
        """One heartbeat now (the run-once step of run()). The daemon takes its first portals
        with it before it reports ready, so that an instance alone drains at once."""
        async with self._lock:
            if not self._halted.is_set():
                await self._tick()

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat, renew, take over and rebalance until stopped; listen for the others'
        announcements meanwhile. Through a database outage, try again (the leases lapse
        locally in the meantime)."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen(stop), name="cluster_listen")
            await self._beat(stop)

    async def stop(self) -> None:
        """Hand every portal back at once, mark this instance stopped and tell the others.
        Call it once nothing more is sent (on_lost is not called)."""
        self._halted.set()
        for task in list(self._letting_go):  # (nothing is sent any more: no need to wait)
            task.cancel()
        if self._letting_go:
            await asyncio.wait(list(self._letting_go))
        async with self._lock:
            portals, self._until = set(self._until), {}
            if not self._registered:
                return
            self._registered = False
            try:
                released = await asyncio.shield(self._db(self._repo.stop_instance(self.id)))
            except DatabaseError as exc:  # (the leases expire on their own)
                log.warning("cluster_stop_failed", instance=self.id, error=str(exc))
                return
        log.info("cluster_stopped", instance=self.id, portals=len(portals), released=released)

    # -- taking and giving back -------------------------------------------------------------

    async def acquire(self, portal_ids: Iterable[int]) -> set[int]:
        """Take those of these portals that nobody validly owns, now (work arrived for them),
        up to this instance's fair share; the portals taken."""
        if self._halted.is_set():
            return set()
        async with self._lock:
            if not self._registered:
                return set()
            wanted = [p for p in dict.fromkeys(portal_ids) if p not in self._until]
            wanted = [p for p in wanted if not self._cooling(p)]
            new = sum(1 for p in wanted if p not in self._counted)
            room = self.fair_share(new) - len(self._until)
            return await self._take(wanted[: max(room, 0)])

    async def route(self, work: Mapping[int, Collection[int]]) -> None:
        """Work was stored here (queue ids by portal) for portals this instance does not own:
        take those nobody owns, up to the fair share (on_gained runs for them), and tell the
        owners of the others in one notification. Portals left without an owner (no room here)
        wake the others' heartbeats, so one with room takes them at once."""
        portals = sorted(p for p in work if not self.owns(p))
        if not portals or self._halted.is_set():
            return
        owners = await self._db(self._repo.owner_of(portals))
        unowned = [p for p in portals if p not in owners]
        taken = await self.acquire(unowned) if unowned else set()
        left = [p for p in unowned if p not in taken]
        # (a portal the database says is ours lapsed here only: the heartbeat takes it up)
        others = {p: work[p] for p in portals if owners.get(p, self.id) != self.id}
        if others or left:
            payload = work_payload(self.id, others, wake=bool(left))
            await self._db(self._repo.announce_work(payload))

    async def release(self, portal_ids: Iterable[int]) -> set[int]:
        """Hand these portals back at once (idle ones, say): on_lost is called first, then
        the others are told. The portals handed back (once they are)."""
        async with self._lock:
            portals = set(portal_ids) & set(self._until)
            task = self._hand_back(portals)
        if task is not None:
            await asyncio.shield(task)
        return portals

    def _cooling(self, portal_id: int) -> bool:
        """Handed back here less than a heartbeat ago: left to the others for now."""
        handed = self._handed.get(portal_id)
        return handed is not None and self._clock() - handed < self.interval_s

    async def _take(self, portal_ids: list[int]) -> set[int]:
        if not portal_ids:
            return set()
        sent = self._clock()
        taken = await self._db(self._repo.acquire_portals(self.id, portal_ids, self.lease_s))
        self._handed = {p: t for p, t in self._handed.items() if sent - t < self.lease_s}
        if any(p in self._handed for p in taken):
            # Handed back, and nobody took it: the instance that seemed to have room does not
            # take any (it fails, say). No more handing back for a while, not every heartbeat.
            self._calm_until = sent + self.lease_s
            log.info("cluster_rebalance_paused", instance=self.id, seconds=self.lease_s)
        if taken:
            await self._gained(taken, sent)
        return set(taken)

    async def _gained(self, previous: dict[int, str | None], sent: float) -> None:
        """Count these portals as owned, then let the scheduler take them up; if it cannot,
        they are not owned here (the next heartbeat, still finding them ours, tries again)."""
        portals = set(previous)
        until = sent + self.lease_s - self.margin_s
        self._until.update(dict.fromkeys(portals, until))
        others = sorted({p for p in previous.values() if p is not None and p != self.id})
        log.info(
            "portals_acquired",
            instance=self.id,
            count=len(portals),
            portals=_some(portals),
            taken_over_from=others[:LOGGED_PORTALS],
        )
        try:
            await self.on_gained(portals, previous)
        except BaseException:
            for p in portals:
                self._until.pop(p, None)
            raise

    def _hand_back(self, portals: set[int]) -> asyncio.Task[None] | None:
        """Stop sending for these portals now, and hand their leases back once on_lost is
        over (their requests under way answered and written), in a task of its own: the
        heartbeat goes on renewing the other leases (and these, until then) meanwhile."""
        if not portals:
            return None
        for p in portals:
            del self._until[p]
        self._handed.update(dict.fromkeys(portals, self._clock()))
        self._settling |= portals
        task = asyncio.create_task(self._let_go(portals), name="cluster-hand-back")
        self._letting_go.add(task)
        task.add_done_callback(self._let_go_done)
        return task

    async def _let_go(self, portals: set[int]) -> None:
        outage = Outage("cluster_hand_back", "cluster_hand_back_failed")
        while True:
            try:
                await self.on_lost(portals)  # (nothing is sent for them from here on)
                break
            except DatabaseError as exc:  # (an outcome not written yet: kept, tried again)
                await wait_event(self._halted, outage.failed(exc, portals=len(portals)))
                if self._halted.is_set():
                    return  # (stop() hands every lease back)
        outage.over()
        async with self._lock:
            self._settling -= portals
            if self._halted.is_set():
                return
            self._unreleased |= portals
            try:
                await self._release_pending()
            except DatabaseError:
                return  # (the next heartbeat deletes them)
        log.info(
            "portals_handed_back", instance=self.id, count=len(portals), portals=_some(portals)
        )

    def _let_go_done(self, task: asyncio.Task[None]) -> None:
        self._letting_go.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._failed.append(task)  # (a bug: the heartbeat raises it, and the daemon stops)
            self._wake.set()

    async def _release_pending(self) -> None:
        """Delete the leases handed back here (after an outage: those it kept in the database)."""
        if self._unreleased:
            await self._db(self._repo.release_portals(self.id, sorted(self._unreleased)))
            self._unreleased.clear()

    # -- the heartbeat ----------------------------------------------------------------------

    async def _beat(self, stop: asyncio.Event) -> None:
        outage = Outage("cluster", "cluster_heartbeat_failed")
        while not (stop.is_set() or self._halted.is_set()):
            self._wake.clear()
            delay = self.interval_s
            try:
                async with self._lock:
                    if not self._halted.is_set():
                        await self._tick()
                outage.over()
                if self._suspended:
                    self._suspended = False
                    log.info("cluster_sending_resumed", instance=self.id)
            except DatabaseError as exc:  # (the next try is at a lease's local end, if sooner)
                if isinstance(exc, DatabaseUnavailable):
                    self.suspend("heartbeat failed")
                    self._wake.clear()  # (the outage's backoff, not at once)
                delay = min(outage.failed(exc, instance=self.id), self.interval_s)
            await wait_event(self._wake, self._wait(delay), stop, self._halted)

    def _wait(self, delay: float) -> float:
        """Until the next heartbeat, or the first local end of a lease if sooner."""
        first = min(self._until.values(), default=math.inf)
        return max(0.0, min(delay, first - self._clock()))

    async def _tick(self) -> None:
        """One heartbeat: renew, take up portals that need an owner, rebalance."""
        if self._failed:
            self._failed.pop().result()  # (raises)
        await self._expire()
        if not self._registered:
            await self._register()
        sent = self._clock()
        held = await self._db(self._repo.heartbeat(self.id, self.name, self.lease_s))
        held -= self._unreleased  # (renewed, but handed back here: deleted now)
        held -= self._settling  # (renewed until they are handed back: not ours to send for)
        await self._release_pending()
        await self._renewed(held, sent)
        survey = await self._db(self._repo.survey(self.id, self.lease_s))
        self._note(survey)
        excess = self._excess(survey)
        if excess:
            self._hand_back(set(sorted(self._until)[-excess:]))
            return
        room = self.fair_share() - len(self._until)
        if room > 0 and survey.candidates:
            free = [p for p in survey.candidates if not self._cooling(p)]
            random.shuffle(free)  # (instances taking at once mostly take different portals)
            await self._take(free[:room])

    async def _end_dead(self) -> None:
        """End now the leases of instances named hostname:pid for this host whose process is
        gone (a crash, kill -9): nothing of theirs can be in flight any more."""
        prefix = socket.gethostname() + ":"
        holders = await self._db(self._repo.named_holders(self.id, prefix))
        dead = sorted(i for i, name in holders.items() if _process_gone(name, prefix))
        if not dead:
            return
        expired = await self._db(self._repo.end_instances(dead))
        log.warning(
            "cluster_dead_instances_ended",
            instance=self.id,
            dead=dead[:LOGGED_PORTALS],
            leases=expired,
            reason="same host, process gone",
        )

    async def _register(self) -> None:
        await self._db(self._repo.register_instance(self.id, self.name))
        self._registered = True
        log.info("cluster_joined", instance=self.id, name=self.name, lease_s=self.lease_s)

    async def _renewed(self, held: set[int], sent: float) -> None:
        """Extend the leases renewed; give up those another took over; take up again those
        still ours that lapsed here (or whose on_gained raised)."""
        lost = set(self._until) - held
        if lost:
            for p in lost:
                del self._until[p]
            log.warning(
                "portal_leases_lost", instance=self.id, count=len(lost), portals=_some(lost)
            )
            await self.on_lost(lost)
        until = sent + self.lease_s - self.margin_s
        regained = held - set(self._until)
        for p in held & set(self._until):
            self._until[p] = until
        if regained:
            await self._gained(dict.fromkeys(regained, self.id), sent)

    async def _expire(self) -> None:
        """Leases whose local end has passed (renewals failed): stop sending for them."""
        now = self._clock()
        lapsed = {p for p, until in self._until.items() if until <= now}
        if not lapsed:
            return
        for p in lapsed:
            del self._until[p]
        log.warning(
            "portal_leases_expired_locally",
            instance=self.id,
            count=len(lapsed),
            portals=_some(lapsed),
            reason="not renewed in time",
        )
        await self.on_lost(lapsed)

    def _note(self, survey: Survey) -> None:
        self._live = max(1, survey.live)
        self._total = survey.leased + survey.unowned
        self._counted = set(self._until) | set(survey.candidates)

    def _excess(self, survey: Survey) -> int:
        """Portals to hand back so that an instance with room gets them: those beyond the fair
        share, or one at the fair share when another holds two fewer or less. None while some
        portal waits for an owner: those with room take it first (what was just handed back,
        say), and the balance is looked at again."""
        mine, fair, fewest = len(self._until), self.fair_share(), survey.fewest_other
        if fewest is None or fewest >= fair or survey.unowned:
            return 0
        if self._clock() < self._calm_until:
            return 0
        if mine > fair:
            return mine - fair
        return 1 if mine == fair and fewest <= fair - 2 else 0


def _process_gone(name: str, prefix: str) -> bool:
    """Whether `name` is hostname:pid of this host, for a pid that is no longer running (not
    this process's: instances in one process share its pid)."""
    pid = decimal_id(name[len(prefix) :])
    if pid is None or pid <= 0 or pid == os.getpid() or len(name) >= MAX_INSTANCE_NAME:
        return False  # (a name cut to the maximum may have lost digits)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # (it exists, another user's)
        return False
    return False
