"""The composition root: build the parts from the configuration, wire them, run, stop.

Nothing else lives here. Each part's behaviour belongs to its own module.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

import structlog

from relayd.config import Config
from relayd.fsutil import ensure_dir, resolve_gid, share_dir
from relayd.inbound.intake import Intake
from relayd.inbound.server import InboundServer, ServerState, load_host_keys, resolve_auth
from relayd.ledger import Ledger
from relayd.outbound.acks import Acknowledger
from relayd.outbound.delivery import DeliveryWorker
from relayd.outbound.outbox import Outbox
from relayd.outbound.returns import ReturnDrops, watch_returns
from relayd.outbound.watcher import DropWatcher

log = structlog.get_logger("relayd.daemon")


def prepare_storage(config: Config) -> None:
    """Create the storage folders, and remove partial uploads that a previous run left behind."""
    for folder in (config.storage.root, config.storage.staging, config.storage.quarantine, config.storage.archive):
        ensure_dir(folder)
    for account in config.accounts:
        drop = ensure_dir(config.drop_dir(account))
        # No session is open before the server starts, so whatever sits here was never committed.
        for leftover in drop.iterdir():
            if leftover.is_file() or leftover.is_symlink():
                log.warning("startup.partial_removed", account=account.username, upload=leftover.name,
                            size=leftover.lstat().st_size)
                leftover.unlink()
    for commune in config.communes:
        # The business software takes dossiers from the inbox, drops returns and clears refused ones:
        # with a group configured, those folders are shared with it; without one, they are left as they are.
        folders = [commune.inbox] + ([commune.returns, commune.rejected_dir] if commune.returns is not None else [])
        for folder in folders:
            if commune.group is not None:
                share_dir(folder, resolve_gid(commune.group))
            else:
                ensure_dir(folder, 0o755)


async def run(config: Config, *, on_ready: Callable[[InboundServer], Awaitable[None]] | None = None) -> None:
    """Run relayd until SIGTERM or SIGINT."""
    prepare_storage(config)
    loop = asyncio.get_running_loop()
    ledger = Ledger(config.storage.ledger)
    outbox = Outbox.from_config(ledger, config)
    worker = DeliveryWorker(outbox, config.platform)
    # Intake and the returns run in worker threads; the delivery worker listens on the loop.
    outbox.on_enqueue = lambda: loop.call_soon_threadsafe(worker.wake)
    outbox.recover()
    drops = ReturnDrops(config, ledger, outbox)
    intake = Intake(config, ledger, Acknowledger(config, outbox, drops))
    recovered = await asyncio.to_thread(intake.recover)
    if recovered:
        log.info("startup.recovered", packages=len(recovered))
    state = ServerState(config=config, intake=intake, auth=resolve_auth(config))
    server = InboundServer(state, load_host_keys(config.server.host_keys))
    await server.start()
    watcher = DropWatcher([c.returns for c in config.communes if c.returns is not None],
                          settle_seconds=config.returns.settle_seconds, rescan_seconds=config.returns.rescan_seconds)
    watcher.start()
    tasks = [asyncio.create_task(worker.run(), name="delivery"),
             asyncio.create_task(watch_returns(watcher, drops), name="returns")]

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        await on_ready(server)
    log.info("relayd.ready", port=server.port, communes=[c.insee for c in config.communes])
    try:
        await stop.wait()
    finally:
        log.info("relayd.stopping")
        await server.close()
        watcher.stop()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ledger.close()
        log.info("relayd.stopped")
