"""What a submission may ask the API for (core.budgets.grant): the smallest of what was
requested, what the job's max_credits allows and what each reserving budget has left."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from supervisor.config import load_config
from supervisor.core.budgets import AdmissionRefused, BudgetStatus, Usage, grant

NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)

CONFIG = """
[api]
base_url = "http://127.0.0.1:1"
credits_per_result = {per_result}

[budgets.pool]
match = {{ team = "growth" }}
credits = 100
reserve = true
action = "block"

[budgets.shadow]
match = {{ team = "growth" }}
credits = 5
action = "observe"
"""


def status(name: str, credits: int, spent: int = 0, reserved: int = 0, action: str = "block") -> BudgetStatus:
    return BudgetStatus(name, credits, "day", None, Usage(spent, reserved), action)


@pytest.fixture(params=[1, 2])
def per_result(request: pytest.FixtureRequest, tmp_path: Path) -> int:
    (tmp_path / "supervisor.toml").write_text(CONFIG.format(per_result=request.param))
    return int(request.param)


def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_config(tmp_path / "supervisor.toml")


GROWTH = {"team": "growth"}


@pytest.mark.parametrize(
    ("requested", "max_credits", "spent", "reserved", "results", "clamped_by"),
    [
        (30, None, 0, 0, 30, ()),  # fits whole
        (500, 60, 0, 0, 60, ("max_credits",)),  # the policy's cap
        (40, None, 0, 80, 20, ("budgets.pool",)),  # what the budget has left
        (40, 30, 0, 80, 20, ("max_credits", "budgets.pool")),  # both, the smaller wins
    ],
)
def test_the_grant_is_the_smallest_allowance(
    tmp_path: Path,
    per_result: int,
    requested: int,
    max_credits: int | None,
    spent: int,
    reserved: int,
    results: int,
    clamped_by: tuple[str, ...],
) -> None:
    # Scale the money to the price so the table reads in results.
    statuses = [
        status("pool", 100 * per_result, spent * per_result, reserved * per_result),
        status("shadow", 5, 50, action="observe"),
    ]
    cap = max_credits * per_result if max_credits is not None else None
    given = grant(config(tmp_path), GROWTH, requested, statuses, max_credits=cap)
    assert (given.results, given.clamped_by) == (results, clamped_by)
    assert given.credits == results * per_result
    assert given.clamped is (results < requested)
    assert given.reserving == ("pool",)


def test_nothing_left_is_refused_with_the_numbers(tmp_path: Path, per_result: int) -> None:
    with pytest.raises(AdmissionRefused, match=r"'pool' is full: spent \d+ \+ reserved \d+ of \d+"):
        grant(config(tmp_path), GROWTH, 10, [status("pool", 100, 40, 60)], max_credits=None)


def test_an_exhausted_budget_refuses_and_an_observe_one_never_does(tmp_path: Path, per_result: int) -> None:
    with pytest.raises(AdmissionRefused, match="exhausted"):
        grant(config(tmp_path), GROWTH, 1, [status("pool", 100, 100)], max_credits=None)
    given = grant(config(tmp_path), GROWTH, 10, [status("shadow", 5, 50, action="observe")], max_credits=None)
    assert (given.results, given.reserving) == (10, ())


def test_other_teams_are_not_held_by_the_budget(tmp_path: Path, per_result: int) -> None:
    given = grant(config(tmp_path), {"team": "search"}, 40, [status("pool", 100, 0, 100)], max_credits=None)
    assert (given.results, given.clamped_by, given.reserving) == (40, (), ())
