"""The composition root: build the parts from the configuration, wire them, and run their lifecycle.

Lifecycle, as systemd sees it (``systemd/relayd.service``, ``Type=notify``):

* start: READY=1 once the SFTP port listens and every part runs;
* while running: WATCHDOG=1 only while the event loop turns and intake and the outbox worker
  are healthy, with STATUS= a short live summary;
* SIGHUP: RELOADING=1, read the configuration again and hand it to every part; a configuration
  that does not load is logged and the running one is kept; READY=1;
* SIGTERM (or SIGINT): STOPPING=1, stop accepting, let uploads under way finish within
  ``server.stop_grace_seconds``, let the outbox worker finish its current file, then stop.

Each part's behaviour belongs to its own module; only the wiring lives here.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import structlog

from relayd.clock import SYSTEM_CLOCK, Clock
from relayd.config import Config, ConfigError, load_config
from relayd.events import Events
from relayd.fsutil import ensure_dir, resolve_gid, share_dir
from relayd.inbound.host_keys import ensure_host_keys
from relayd.inbound.intake import Intake, IntakeRetries
from relayd.inbound.server import InboundServer, ServerState, resolve_auth
from relayd.inbound.uploads import UploadArea
from relayd.ledger_admin import open_for_run
from relayd.mail import Mailer
from relayd.metrics import Metrics
from relayd.outbound.acks import Acknowledger, AckRepair
from relayd.outbound.delivery import DeliveryWorker
from relayd.outbound.outbox import Outbox
from relayd.outbound.returns import ReturnDrops, watch_returns
from relayd.outbound.watcher import DropWatcher
from relayd.retention import Retention
from relayd.health import Health
from relayd.systemd import Notifier, listen_sockets

log = structlog.get_logger("relayd.daemon")

class Part(Protocol):
    """A background part of the daemon (mail, metrics, retention...): it runs until cancelled and follows reloads."""

    name: str

    def run(self) -> Coroutine[Any, Any, None]: ...

    def reconfigure(self, config: Config) -> None: ...


def prepare_folders(config: Config) -> None:
    """Create the storage folders and every account's and commune's folders (at start-up and on reload)."""
    for folder in (config.storage.root, config.storage.staging, config.storage.quarantine, config.storage.archive):
        ensure_dir(folder)
    for account in config.accounts:
        ensure_dir(config.drop_dir(account))
    for commune in config.communes:
        # The business software takes dossiers from the inbox, drops returns and clears refused ones:
        # with a group configured, those folders are shared with it; without one, they are left as they are.
        folders = [commune.inbox] + ([commune.returns, commune.rejected_dir] if commune.returns is not None else [])
        for folder in folders:
            if commune.group is not None:
                share_dir(folder, resolve_gid(commune.group))
            else:
                ensure_dir(folder, 0o755)


def prepare_storage(config: Config) -> None:
    """Create the folders, and remove partial uploads that a previous run left behind (start-up only)."""
    prepare_folders(config)
    for account in config.accounts:
        # No session is open before the server starts, so whatever sits here was never committed.
        UploadArea(config.drop_dir(account)).discard_leftovers(account.username)
        for leftover in config.drop_dir(account).iterdir():
            if leftover.is_file() or leftover.is_symlink():
                log.warning("startup.partial_removed", account=account.username, upload=leftover.name,
                            size=leftover.lstat().st_size)
                leftover.unlink()


def _return_dirs(config: Config) -> list[Path]:
    return [c.returns for c in config.communes if c.returns is not None]


async def run(config: Config, *, config_path: Path | None = None,
              on_ready: Callable[[InboundServer], Awaitable[None]] | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
    """Run relayd until SIGTERM or SIGINT; SIGHUP reloads ``config_path``."""
    notifier = Notifier.from_environment()
    prepare_storage(config)
    loop = asyncio.get_running_loop()
    events = Events()
    ledger = open_for_run(config)
    outbox = Outbox.from_config(ledger, config)
    outbox.events = events
    worker = DeliveryWorker(outbox, config.platform, events=events)
    # Intake and the returns run in worker threads; the delivery worker listens on the loop.
    outbox.on_enqueue = lambda: loop.call_soon_threadsafe(worker.wake)
    outbox.recover()
    drops = ReturnDrops(config, ledger, outbox)
    acks = Acknowledger(config, outbox, drops)
    intake = Intake(config, ledger, acks, events)
    state = ServerState(config=config, intake=intake, auth=resolve_auth(config), events=events)
    intake.disk = state.disk
    recovered = await asyncio.to_thread(intake.recover)
    if recovered:
        log.info("startup.recovered", packages=len(recovered))
    server = InboundServer(state, ensure_host_keys(config))
    await server.start(socks=listen_sockets())
    watcher = DropWatcher(_return_dirs(config), settle_seconds=config.returns.settle_seconds,
                          rescan_seconds=config.returns.rescan_seconds)
    watcher.start()

    # The background parts: each hears the events it needs, runs until cancelled and follows reloads.
    metrics = Metrics(config, ledger, state, clock)
    mailer = Mailer(config, ledger, clock)
    events.subscribe(metrics.on_event)
    events.subscribe(mailer.on_event)
    parts: list[Part] = [metrics, mailer, state.disk, Retention(config, ledger, clock), IntakeRetries(intake),
                         AckRepair(acks)]

    delivery = asyncio.create_task(worker.run(), name="delivery")
    tasks = [asyncio.create_task(watch_returns(watcher, drops), name="returns")]
    tasks += [asyncio.create_task(part.run(), name=part.name) for part in parts]

    def reload(path: Path) -> None:
        """Read the configuration again and hand it to every part; keep the running one if it does not load."""
        nonlocal config
        notifier.reloading()
        try:
            new = load_config(path)
            auth = resolve_auth(new)
            prepare_folders(new)
        except (ConfigError, OSError) as exc:
            log.error("reload.refused", config=str(path), error=str(exc), kept="the running configuration")
            notifier.ready(health.summary("reload refused: the running configuration is kept"))
            return
        for key, old_value, new_value in _needs_restart(config, new):
            log.warning("reload.needs_restart", key=key, running=old_value, configured=new_value)
        config = new
        state.config, state.auth = new, auth
        intake.config = acks.config = drops.config = new
        if watcher.directories != _return_dirs(new):
            watcher.set_directories(_return_dirs(new))
        outbox.reconfigure(new)
        worker.reconfigure(new.platform)
        for part in parts:
            part.reconfigure(new)
        log.info("reload.done", config=str(path), accounts=len(new.accounts), communes=[c.insee for c in new.communes])
        notifier.ready(health.summary())

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload, config_path)

    health = Health(notifier, state, outbox, worker, [delivery, *tasks])
    await health.read_counts()  # so that the first STATUS= shows the outbox as it is
    watching = asyncio.create_task(health.run(), name="health")
    if on_ready is not None:
        await on_ready(server)
    notifier.ready(health.summary())
    log.info("relayd.ready", port=server.port, communes=[c.insee for c in config.communes])
    try:
        await stop.wait()
    finally:
        if config_path is not None:
            loop.remove_signal_handler(signal.SIGHUP)  # no reload half-way through a stop
        grace = config.server.stop_grace_seconds
        deadline = loop.time() + grace
        notifier.stopping(f"stopping: {state.uploads_in_flight()} upload(s) under way, {grace:g} s to finish")
        log.info("relayd.stopping", uploads=state.uploads_in_flight(), grace_seconds=grace)
        watching.cancel()
        worker.stop()
        await server.close(grace_seconds=grace)
        watcher.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, watching, return_exceptions=True)
        # The worker was told to stop after its current file; past the grace (shared with the
        # uploads) it is cut, and the file is sent again at the next start under the same name.
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 1.0)):
                await asyncio.shield(delivery)
        except TimeoutError:
            delivery.cancel()
        await asyncio.gather(delivery, return_exceptions=True)
        intake.tidy()
        acks.write_files()  # every ack still owed leaves its file behind, for an operator and for the next start
        ledger.close()
        notifier.close()
        log.info("relayd.stopped")


def _needs_restart(old: Config, new: Config) -> list[tuple[str, object, object]]:
    """What a reload cannot change in a running process: the listening address, storage and host keys.

    (The metrics endpoint says so itself for its own address.)
    """
    pairs = [("server.listen", old.server.listen, new.server.listen),
             ("server.extra_listen", old.server.extra_listen, new.server.extra_listen),
             ("storage.root", old.storage.root, new.storage.root),
             ("server.host_keys", old.server.host_keys, new.server.host_keys),
             ("server.host_key_types", old.server.host_key_types, new.server.host_key_types),
             ("server.profile", old.server.profile, new.server.profile)]
    return [(key, str(a), str(b)) for key, a, b in pairs if a != b]
