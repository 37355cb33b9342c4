"""A config reload (SIGHUP): the one way a new file's content gets into force.

The file is read bounded (in time: a hung filesystem), validated whole, compared with the
running config, and refused (the running config kept, one error line, a metric) rather
than adopted when it would quietly weaken enforcement: a file that cannot be read in time,
is not a regular file, is too large, invalid or empty, or one that removes a policy or
budget still used by running jobs or open reservations (unless it sets
`supervisor.allow_orphaning = true`). Sections and keys that shaped what was built at
start are adopted but said to need a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import structlog

from supervisor.adapters import metrics
from supervisor.adapters.store import Store, db_error_text
from supervisor.config import Config, ConfigError, changed_keys, load_config
from supervisor.core.states import ACTIVE

log = structlog.get_logger("supervisor.daemon")

# Sections and [supervisor] keys a reload cannot apply: they shaped what was built at start
# (the client, the store, the hooks, the admin API, the scheduler's intervals).
RESTART_SECTIONS = ("database", "api", "http")
RESTART_KEYS = ("tick_interval", "lease_ttl", "leader_ttl")
# A reload reads a small local file: longer than this means a hung filesystem.
RELOAD_READ_TIMEOUT = 5.0


class Reloader:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        current: Callable[[], Config],
        adopt: Callable[[Config], None],
        *,
        check: Callable[[Config], None] = lambda config: None,
    ) -> None:
        """`current` is the config in force, `adopt` the daemon's one way to change it,
        `check` what else must hold of a new config (raises ConfigError: the webhooks'
        secrets readable)."""
        self._check = check
        self._store = store
        self._clock = clock
        self._current = current
        self._adopt = adopt
        self._lock = asyncio.Lock()

    async def reload(self, path: Path) -> bool:
        """Adopt `path`'s content for every job's next evaluation and every service's next
        run, or refuse it and keep the running config. Returns whether the new config is
        now in force. Reloads run one at a time, in the order asked."""
        async with self._lock:
            old = self._current()
            problem: str | None = None
            try:
                async with asyncio.timeout(RELOAD_READ_TIMEOUT):
                    new = await asyncio.to_thread(load_config, path, require_settings=True)
                await self._refuse_orphaning(old, new)
                self._check(new)
            except TimeoutError:
                problem = f"{path}: not read within {RELOAD_READ_TIMEOUT:g} s"
            except ConfigError as exc:
                problem = str(exc)
            if problem is not None:
                metrics.CONFIG_RELOADS.labels("failure").inc()
                # The wording and the `error` key are what operators' alerts already match.
                log.error("config reload failed; keeping the previous config", error=problem)
                return False
            for section in RESTART_SECTIONS:
                if getattr(new, section) != getattr(old, section):
                    log.warning("config change needs a restart to take effect", section=section)
            for key in RESTART_KEYS:
                if getattr(new.supervisor, key) != getattr(old.supervisor, key):
                    log.warning("config change needs a restart to take effect", key=f"supervisor.{key}")
            self._adopt(new)
            metrics.CONFIG_RELOADS.labels("success").inc()
            log.info("config reloaded", changed=changed_keys(old, new), config_hash=new.config_hash)
            return True

    async def _refuse_orphaning(self, old: Config, new: Config) -> None:
        """ConfigError when `new` removes a policy that running jobs are on, or a budget
        that running jobs or open reservations count against: those jobs would silently
        be judged by other limits (a removed policy falls back to `default`)."""
        policies = [name for name in old.policies if name not in new.policies]
        budgets = [name for name in old.budgets if name not in new.budgets]
        if not (policies or budgets) or new.supervisor.allow_orphaning:
            return
        source = new.source
        try:
            running = [job for state in ACTIVE for job in await self._store.list_jobs(state.value)]
            reserved = [
                labels
                for rows in (await self._store.usage([None], self._clock())).values()
                for labels, usage in rows
                if usage.reserved > 0
            ] if budgets else []  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - whatever failed, unchecked means refused
            raise ConfigError(
                f"{source}: cannot check that no running job uses a removed policy or budget "
                f"(database: {db_error_text(exc)})"
            ) from None
        escape = "set supervisor.allow_orphaning = true to remove it anyway"
        for name in policies:
            users = sum(job.policy == name for job in running)
            if users:
                raise ConfigError(f"{source}: policies.{name}: removed, but {users} running job(s) use it ({escape})")
        for name in budgets:
            users = sum(name in old.budgets_for(dict(job.labels)) for job in running)
            holds = sum(name in old.budgets_for(labels) for labels in reserved)
            if users or holds:
                raise ConfigError(
                    f"{source}: budgets.{name}: removed, but {users} running job(s) and {holds} open "
                    f"reservation(s) count against it ({escape})"
                )
