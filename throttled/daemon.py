"""The daemon: opens every resource in one place, runs the loops in a TaskGroup, stops in order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from aiohttp import web

from throttled import alerts, crypto, housekeeping, metrics, rates
from throttled.changes import ChangeWatcher
from throttled.cluster import Cluster
from throttled.config import Config
from throttled.db import migrate
from throttled.db.embedded import embedded_database
from throttled.db.repository import Repository
from throttled.drain.dispatcher import Dispatcher
from throttled.drain.supervisor import Supervisor
from throttled.exporter import Exporter
from throttled.housekeeping import maintain_once as maintain_once  # (tests call it)
from throttled.hubspot.client import HubSpotClient, trace_config
from throttled.hubspot.fake import FakeHubSpot
from throttled.hubspot.oauth import OAuth
from throttled.ingest import Ingest
from throttled.intake import Intake
from throttled.liveness import LoopMonitor
from throttled.sdnotify import Notifier, keepalive, watchdog_interval
from throttled.steering import Steering
from throttled.tokens import WAITING_FOR_CONNECTION, Tokens
from throttled.web.admin import AdminAuth
from throttled.web.app import make_app
from throttled.web.server import Runner
from throttled.web.services import Services

log = structlog.get_logger(__name__)


DEV_SECRET = "dev.placeholder.not.a.secret"  # throttled.dev.toml's, printed in mock mode


class StartupError(Exception):
    """The daemon cannot start; the message says what to do."""


@dataclass(eq=False, kw_only=True)
class Runtime:
    """The running daemon's parts, for tests, the demo and benchmarks."""

    config: Config
    port: int
    repo: Repository
    scheduler: Supervisor
    dispatcher: Dispatcher
    cluster: Cluster  # this instance's portal leases
    ingest: Ingest
    services: Services
    fake: FakeHubSpot | None
    api_base_url: str
    watcher: ChangeWatcher | None = None
    exporter: Exporter  # /metrics: this daemon's registry

    @property
    def url(self) -> str:
        """The daemon's base URL."""
        return f"http://{self.config.server.host}:{self.port}"


@contextlib.asynccontextmanager
async def database_url(config: Config) -> AsyncIterator[str]:
    """The configured URL, or an embedded PostgreSQL under `database.data_dir`."""
    url = config.database.url.reveal()
    if url:
        yield url
        return
    async with embedded_database(config.database.data_dir) as embedded:
        yield embedded


def keyring_for(config: Config) -> crypto.KeyRing:
    """The token key ring; in mock mode a development key is kept under the data dir."""
    primary = config.security.encryption_key.reveal()
    previous = [k.reveal() for k in config.security.previous_encryption_keys]
    if not primary and config.hubspot.mock:
        primary = _dev_key(Path(config.database.data_dir))
    if not primary:
        raise StartupError(
            "security.encryption_key (or ENCRYPTION_KEY) is required: 32 random bytes as "
            "base64; make one with: throttled keys generate"
        )
    try:
        return crypto.KeyRing.from_texts(primary, previous)
    except crypto.CryptoError as exc:
        raise StartupError(
            f"security.encryption_key: {exc}; make one with: throttled keys generate"
        ) from None


def _dev_key(data_dir: Path) -> str:
    path = data_dir / "dev-encryption.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(crypto.generate_key())
        path.chmod(0o600)
    return path.read_text().strip()


async def check_migrations(config: Config, url: str) -> str:
    """Refuse to start on a schema that is behind, unless auto-migrate is on. Return why the
    schema is still not current ("" when it is): migrated by a newer version, it is served,
    but /readyz says so."""
    state = await asyncio.to_thread(migrate.check, url)
    pending = state.pending
    if pending and config.database.auto_migrate:
        applied = await asyncio.to_thread(migrate.apply, url)
        log.info("migrations_applied", ids=applied)
    elif pending:
        raise StartupError(
            f"{len(pending)} database migration(s) pending ({', '.join(pending)}); "
            f"run: throttled migrate --config {config.source}"
        )
    if state.unknown:
        log.warning("schema_not_current", reason=state.problem())
        return state.problem()
    return ""


def _tune_gc() -> None:
    """Keep garbage collection from stalling the loop. A full collection walks every object
    the scheduler holds (about 20 per active queue, plus the rows claimed ahead); measured with
    10,000 active queues it stopped the loop for 40-190 ms several times in 10 s, which shows
    straight through as first-send latency. What is alive at start-up (modules, config, the
    recovered queues) is frozen out of collection; young collections run every 5,000
    allocations instead of 700; a full one only after 1,000 middle ones (CPython's own rule,
    that a full collection waits until survivors grew by 25 %, still applies)."""
    if not any(isinstance(cb, metrics.GcTimer) for cb in gc.callbacks):
        gc.callbacks.append(metrics.GcTimer())  # its pauses show in /metrics
    gc.collect()
    gc.freeze()
    gc.set_threshold(5000, 5, 1000)


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[Runtime], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> None:
    """Run until `stop` is set, then shut down gracefully within the shutdown timeout."""
    stop = stop or asyncio.Event()
    keyring = keyring_for(config)  # (checked before any database work, as is the secret)
    signing_secrets(config)
    async with contextlib.AsyncExitStack() as stack:
        url = await stack.enter_async_context(database_url(config))
        schema_problem = await check_migrations(config, url)
        repo = await stack.enter_async_context(
            Repository.open(
                url,
                min_size=config.database.pool_min,
                max_size=config.database.pool_max,
                timeout=config.database.connect_timeout_s,
                command_timeout=config.database.command_timeout_s,
            )
        )
        session = await stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256), trace_configs=[trace_config()]
            )
        )
        fake, api_base = await _hubspot(config, stack)
        runtime = await _assemble(config, repo, session, keyring, fake, api_base, clock)
        runtime.services.schema_problem = schema_problem
        runtime.services.loop = LoopMonitor(asyncio.get_running_loop().time)
        runner = Runner(
            make_app(runtime.services, runtime.exporter.registry),
            timeout_s=config.server.shutdown_timeout_s,
            access_log=None,
            handle_signals=False,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)  # closes open connections by its deadline
        site = web.TCPSite(runner, config.server.host, config.server.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            where = f"{config.server.host}:{config.server.port}"
            raise StartupError(
                f"server.host/server.port: cannot listen on {where}: {exc.strerror or exc}"
            ) from None
        runtime.port = _bound_port(runner, config.server.port)
        notifier = Notifier.from_env(os.environ)
        stack.callback(notifier.close)
        await _join(runtime.cluster)
        runner.deadline = await _run(runtime, stop, on_ready, notifier)


async def _join(cluster: Cluster) -> None:
    """Join the cluster and take this instance's first portals (their claimed rows reset,
    their queues loaded: see drain/handover.py), before the daemon reports ready. If that
    fails, every portal taken goes back at once (nothing was sent for it)."""
    try:
        await cluster.start()
        await cluster.beat_once()
    except BaseException:
        await cluster.stop()
        raise


async def _hubspot(
    config: Config, stack: contextlib.AsyncExitStack
) -> tuple[FakeHubSpot | None, str]:
    if not config.hubspot.mock:
        return None, config.hubspot.api_base_url
    fake = FakeHubSpot(
        client_id=config.hubspot.client_id or "mock-client-id",
        client_secret=config.hubspot.client_secret.reveal() or "mock-client-secret",
        accept_any_refresh_token=True,
    )
    base = await fake.start()
    stack.push_async_callback(fake.close)
    log.info("mock_hubspot_started", url=base)
    return fake, base


async def _assemble(
    config: Config,
    repo: Repository,
    session: aiohttp.ClientSession,
    keyring: crypto.KeyRing,
    fake: FakeHubSpot | None,
    api_base: str,
    clock: Callable[[], float],
) -> Runtime:
    hs = config.hubspot
    client = HubSpotClient(
        session,
        api_base_url=api_base,
        timeout_s=hs.request_timeout_s,
        batch_complete_path=hs.batch_complete_path,
        send_typed_outputs=hs.send_typed_outputs,
    )
    tokens = make_tokens(config, repo, session, keyring, api_base, clock, mock=fake is not None)
    cluster = Cluster(repo, lease_s=config.cluster.lease_s, name=config.cluster.instance_name)
    dispatcher = Dispatcher(
        repo=repo,
        client=client,
        tokens=tokens,
        config=config.sender,
        clock=clock,
        margin_s=config.sender.send_margin_ms / 1000,
        lease_left=cluster.lease_left,
    )
    scheduler = Supervisor(
        repo,
        dispatcher,
        clock=clock,
        lookahead_s=config.sender.lookahead_s,
        claim_ahead_s=config.sender.claim_ahead_s,
        owns=cluster.owns,
        cluster=cluster,
    )
    # (the portals, their claimed rows and their queues are taken up as the leases come:
    # the first ones by _join, before the daemon reports ready)
    assert scheduler.handover is not None
    cluster.on_gained = scheduler.handover.take_over
    cluster.on_lost = scheduler.handover.let_go
    cluster.on_work = scheduler.handover.on_work
    dispatcher.writer.on_unavailable = functools.partial(cluster.suspend, "a result write failed")
    _tune_gc()
    configs = await repo.action_configs()
    intake = Intake(
        defaults=config.default_policy_spec(),
        block_expiration_s=config.block_expiration_s(),
        action_configs=_readable_configs(configs),
        clock=clock,
    )
    ingest = Ingest(
        repo,
        batch_max=config.ingest.batch_max,
        max_pending=config.ingest.max_pending,
        flushers=config.ingest.flushers,
        linger_s=config.ingest.linger_ms / 1000,
        overlap_s=config.ingest.overlap_ms / 1000,
        commit_timeout_s=config.ingest.commit_timeout_s,
        on_stored=scheduler.notify,
    )
    secrets = signing_secrets(config)

    async def wake(portal_id: int) -> None:  # a portal was connected: its rows go now
        queue_ids = await repo.wake_portal(portal_id, WAITING_FOR_CONNECTION)
        if queue_ids:
            scheduler.notify(queue_ids)

    tokens.on_connected = wake
    steering = Steering(repo, intake, scheduler=scheduler)
    steering.on_portal = tokens.reread
    services = Services(
        config=config,
        repo=repo,
        ingest=ingest,
        intake=intake,
        secrets=secrets,
        expiration=hs.block_expiration.strip().upper(),  # (as HubSpot documents it: P7D)
        tokens=tokens,
        admin=AdminAuth.from_config(config.admin),
        auth_base_url=api_base if fake else hs.auth_base_url,  # (the fake serves both)
        clock=clock,
        steering=steering,
    )
    return Runtime(
        config=config,
        port=0,
        repo=repo,
        scheduler=scheduler,
        dispatcher=dispatcher,
        cluster=cluster,
        ingest=ingest,
        services=services,
        fake=fake,
        api_base_url=api_base,
        exporter=Exporter(
            repo=repo,
            scheduler=scheduler,
            dispatcher=dispatcher,
            ingest=ingest,
            health=tokens.health,
        ),
    )


def _readable_configs(
    configs: dict[tuple[int, int], Any],
) -> dict[tuple[int, int], rates.PolicySpec]:
    """The stored admin configs that can be read; one that cannot (a row from an older
    version, or edited by hand) is left out and reported: its actions get the defaults."""
    specs: dict[tuple[int, int], rates.PolicySpec] = {}
    for (portal_id, action_id), stored in configs.items():
        try:
            if not isinstance(stored, dict):
                raise ValueError(f"not an object: {type(stored).__name__}")
            specs[portal_id, action_id] = rates.spec_from_mapping(stored, where="action_config")
        except Exception as exc:  # a stored row: anything may be in it
            log.error(
                "action_config_invalid",
                portal_id=portal_id,
                action_id=action_id,
                error=str(exc)[:300],
            )
    return specs


def oauth_client(
    config: Config, session: aiohttp.ClientSession, api_base: str, *, mock: bool = False
) -> OAuth:
    """The app's OAuth endpoints, in the configured version's dialect."""
    hs = config.hubspot
    return OAuth(
        session,
        api_base_url=api_base,
        client_id=hs.client_id or ("mock-client-id" if mock else ""),
        client_secret=hs.client_secret.reveal() or ("mock-client-secret" if mock else ""),
        timeout_s=hs.request_timeout_s,
        version=hs.oauth_version,
        paths={name: hs.oauth_path(name) for name in ("token", "token_info", "revoke")},
    )


def make_tokens(
    config: Config,
    repo: Repository,
    session: aiohttp.ClientSession,
    keyring: crypto.KeyRing,
    api_base: str,
    clock: Callable[[], float] = time.time,
    *,
    mock: bool = False,
) -> Tokens:
    """The token store the daemon and the CLI use."""
    hs = config.hubspot
    return Tokens(
        repo,
        oauth_client(config, session, api_base, mock=mock),
        keyring,
        margin_s=hs.token_refresh_margin_s,
        clock=clock,
        lock_timeout_s=hs.request_timeout_s + 5.0,
        recheck_s=config.sender.disconnected_retry_s,
        max_refreshing=max(1, config.database.pool_max // 4),
        mock_refresh_token=(lambda p: f"mock-refresh-{p}") if mock else None,
    )


def signing_secrets(config: Config) -> tuple[str, ...]:
    """The secrets that verify request signatures; StartupError if there is none."""
    hs = config.hubspot
    secrets = tuple(
        s.reveal() for s in (hs.client_secret, *hs.previous_client_secrets) if s.reveal()
    )
    if not secrets:
        raise StartupError("hubspot.client_secret (or HUBSPOT_CLIENT_SECRET) is required")
    return secrets


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured


def status_line(runtime: Runtime) -> str:
    """The one-line summary systemd shows (STATUS=): in-memory counts, no query."""
    queues = runtime.scheduler.queues.values()
    active = runtime.scheduler.active
    return (
        f"{len(queues)} queues ({active} active, {len(runtime.scheduler.at_risk)} at risk); "
        f"{runtime.dispatcher.held} claimed for sending, {runtime.ingest.pending} to commit"
    )


async def _run(
    runtime: Runtime,
    stop: asyncio.Event,
    on_ready: Callable[[Runtime], None] | None,
    notifier: Notifier | None = None,
) -> float:
    """Run the loops until `stop`, then drain them; return the shutdown deadline (loop time),
    which the HTTP server's cleanup must meet too. systemd hears READY=1 once the port is
    bound and the loops run, WATCHDOG=1 from this loop until the drain is over, STOPPING=1.
    The portal leases are kept until the sends are over, then handed back at once; not after
    a crash or a timed-out drain, whose claims are left to the next owner to reset."""
    ingest_stop, claim_stop = asyncio.Event(), asyncio.Event()
    send_stop, writer_stop = asyncio.Event(), asyncio.Event()
    cluster_stop = asyncio.Event()
    alive_stop = asyncio.Event()  # the loop monitor and the watchdog: until the very end
    notifier = notifier or Notifier(None)
    config = runtime.config
    async with asyncio.TaskGroup() as tg:
        if runtime.services.loop is not None:
            tg.create_task(runtime.services.loop.run(alive_stop), name="loop-monitor")
        watchdog_s = watchdog_interval(os.environ)
        tg.create_task(
            keepalive(
                notifier, alive_stop, watchdog_s=watchdog_s, status=lambda: status_line(runtime)
            ),
            name="sd-notify",
        )
        cluster_task = tg.create_task(runtime.cluster.run(cluster_stop), name="cluster")
        ingest_task = tg.create_task(runtime.ingest.run(ingest_stop), name="ingest")
        claim_task = tg.create_task(runtime.scheduler.run(claim_stop), name="scheduler")
        send_task = tg.create_task(
            runtime.dispatcher.run(send_stop, writer_stop), name="dispatcher"
        )
        maintenance_task = tg.create_task(housekeeping.run(runtime, claim_stop), name="maintenance")
        alerts_task = tg.create_task(alerts.watch(runtime, claim_stop), name="alerts")
        tg.create_task(runtime.exporter.run(claim_stop), name="metrics")
        watcher = ChangeWatcher(
            runtime.repo, runtime.services.steering, check_s=config.admin.change_check_s
        )
        runtime.watcher = watcher
        watch_task = tg.create_task(watcher.run(claim_stop), name="changes")
        log.info("throttled_ready", url=runtime.url, pid=os.getpid(), mock=config.hubspot.mock)
        if notifier.send("READY=1", f"STATUS={status_line(runtime)}"):
            log.info("systemd_notified", watchdog_s=watchdog_s)
        if config.hubspot.mock and sys.stderr.isatty() and config.logging.format != "json":
            print(_try_it(runtime), file=sys.stderr, flush=True)
        elif config.hubspot.mock:
            log.info("mock_mode", try_it=_try_it(runtime).strip())
        if on_ready is not None:
            on_ready(runtime)
        await stop.wait()
        deadline = asyncio.get_running_loop().time() + config.server.shutdown_timeout_s
        log.info("shutdown_started")
        notifier.send("STOPPING=1", "STATUS=shutting down: committing and finishing sends")
        runtime.services.stopping = True
        try:
            async with asyncio.timeout_at(deadline):
                ingest_stop.set()  # commit what is buffered; new requests already get 503
                await asyncio.wait([ingest_task])
                claim_stop.set()  # no new claims ...
                await asyncio.wait([claim_task])
                send_stop.set()  # ... then finish in-flight sends and release the rest
                writer_stop.set()
                await asyncio.wait([send_task])
                cluster_stop.set()  # nothing more is sent: every portal back at once
                await asyncio.wait([cluster_task])
                await runtime.cluster.stop()
        except TimeoutError:
            log.error("shutdown_timeout", timeout_s=config.server.shutdown_timeout_s)
            for event in (ingest_stop, claim_stop, send_stop, writer_stop, cluster_stop):
                event.set()
            # The time is up: what still runs (a send waiting on HubSpot, say) is cancelled;
            # the rows it held stay claimed, and the leases expire: whoever takes the portals
            # over next (this instance's next start, say) resets them.
            tasks = (
                ingest_task,
                claim_task,
                send_task,
                maintenance_task,
                alerts_task,
                watch_task,
                cluster_task,
            )
            for task in tasks:
                task.cancel()
        alive_stop.set()
    log.info("shutdown_complete")
    return deadline


def _try_it(runtime: Runtime) -> str:
    """How to send a signed test action to a mock-mode daemon."""
    base = runtime.config.server.public_url.rstrip("/") or runtime.url
    command = sys.argv[0] if sys.argv[0].endswith("throttled") else "throttled"
    # Only the development placeholder is ever printed; a real secret stays out of the output.
    configured = runtime.config.hubspot.client_secret.reveal()
    secret = configured if configured == DEV_SECRET else "<hubspot.client_secret>"
    body = (
        '{"callbackId":"ap-62515-1-1-0","origin":{"portalId":62515,"actionDefinitionId":7},'
        '"context":{"source":"WORKFLOWS","workflowId":9},"object":{"objectId":1,'
        '"objectType":"CONTACT"},"inputFields":{"maxThroughput":"2","timeUnit":"seconds"}}'
    )
    return (
        "\nMock mode: completions go to a built-in fake HubSpot. Send a signed test action:\n"
        f"  echo '{body}' > /tmp/action.json\n"
        f'  eval "$({command} sign --secret {secret} --url {base}/api/hubspot/action'
        ' --body /tmp/action.json --curl)"\n'
        f"  curl -s {runtime.url}/metrics | grep completed\n"
    )
