"""From a config to the resources a process runs on: the API client, the store (at the
current schema), and `run_daemon`, the `run` command's process (startup signals, the
daemon, the services beside it)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog
from sqlalchemy.exc import SQLAlchemyError

from supervisor.adapters import limits, migrate
from supervisor.adapters.clado import CladoClient
from supervisor.adapters.dbwatch import DatabaseFault
from supervisor.adapters.logs import configure_logging
from supervisor.adapters.ratelimit_log import RepeatFilter
from supervisor.adapters.secrets import api_key
from supervisor.adapters.store import Routes, Store
from supervisor.adapters.systemd import Notifier
from supervisor.config import Config, ConfigError, load_config
from supervisor.service.runtime import Daemon, Service

log = structlog.get_logger("supervisor.wiring")

# The services that run beside the daemon (the admin API), in two steps: prepared from the
# config before the database is opened (so a missing secret fails fast), then built on the
# daemon.
ServicesFor = Callable[[Config], Callable[[Daemon], Sequence[Service]]]


T = TypeVar("T")


class RuntimeFailure(Exception):
    """Something outside the user's input failed (database, API): exit 1."""


def client_for(config: Config) -> CladoClient:
    return CladoClient(
        config.api.base_url,
        api_key(config),
        timeout=config.api.timeout.total_seconds(),
        max_concurrency=config.api.max_concurrency,
        max_retries=config.api.max_retries,
        initiate_wait=config.api.initiate_wait.total_seconds(),
        transport=config.api.transport,
    )


async def open_store(config: Config) -> Store:
    """A store on a database at the current schema (migrating it if auto_migrate is on)."""
    url = config.database.url
    try:
        if config.database.auto_migrate:
            await asyncio.to_thread(migrate.upgrade, url)
        else:
            schema = await asyncio.to_thread(migrate.check_schema, url)
            if not schema.known:
                raise migrate.SchemaUnknown(schema.problem)
            if not schema.current:
                raise ConfigError(
                    f"{config.source}: database.auto_migrate: the database schema is not current; "
                    "run `clado-supervisor migrate`"
                )
    except migrate.SchemaUnknown as exc:  # a newer version's schema: what to do, in one line
        raise RuntimeFailure(f"database: {exc}") from None
    except SQLAlchemyError as exc:
        raise RuntimeFailure(f"cannot open the database: {_db_error(exc)}") from None
    store = Store(url)
    # Whatever this process commits notifies the hooks of this config (the outbox).
    store.routes = Routes.of(config)
    return store


def _db_error(exc: SQLAlchemyError) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]


def raise_fd_limit() -> None:
    """Before any socket or file is opened: the soft descriptor limit up to the hard one, so
    that connections to the admin API can never take the ones enforcement needs."""
    fd = limits.raise_fd_limit()
    bound = limits.admin_connection_bound(fd.soft)
    if fd.error is not None:
        log.warning("file descriptor limit not raised", soft=fd.soft, hard=fd.hard, error=fd.error)
    elif fd.raised:
        log.info("file descriptor limit raised", before=fd.before, soft=fd.soft, admin_connections=bound)
    else:
        log.info("file descriptor limit", soft=fd.soft, hard=fd.hard, admin_connections=bound)


def _no_services(config: Config) -> Callable[[Daemon], Sequence[Service]]:
    return lambda daemon: ()


async def run_daemon(config_path: Path, services: ServicesFor = _no_services) -> None:
    config = load_config(config_path)
    configure_logging(config.logging.format, config.logging.level)
    # Lines a hostile client can cause at will (adapters/ratelimit_log.py), at most one per
    # key per window, on the handler configure_logging installed.
    repeats = RepeatFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(repeats)
    try:
        await _run(config, config_path, services)
    finally:
        for (logger, level, message), count in repeats.held_back():
            log.info("log lines held back", logger_name=logger, level_name=logging.getLevelName(level),
                     held_back=message, suppressed=count)  # fmt: skip


async def _run(config: Config, config_path: Path, services: ServicesFor) -> None:
    raise_fd_limit()
    # SIGTERM/SIGINT during startup (migrations can take a while) mean "stop", exit 0, not
    # death by the default handler; the daemon installs its own handlers once it runs.
    started: list[Daemon] = []
    stop_early = asyncio.Event()

    def stop() -> None:
        stop_early.set()
        for daemon in started:
            daemon.request_stop()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    client = client_for(config)
    try:
        build_services = services(config)
        store = await open_store(config)
        try:
            if stop_early.is_set():
                return
            daemon = Daemon(config, store, client, config_path=config_path, notifier=Notifier())
            started.append(daemon)
            beside = build_services(daemon)
            if stop_early.is_set():
                daemon.request_stop()
            try:
                await daemon.run_until_signalled(beside)
            except OSError as exc:  # the admin API could not bind its address
                raise RuntimeFailure(str(exc)) from None
            except DatabaseFault as exc:  # exit 1: systemd restarts it on the database as it is
                raise RuntimeFailure(f"database: {exc}") from None
        finally:
            await store.close()
    finally:
        await client.aclose()
