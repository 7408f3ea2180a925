"""promtool rule unit tests of deploy/alerts.yml's latency SLO (multiwindow, multi-burn-rate) and its
refused-reload alert: each fires when it should and stays silent when it should not."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_service_cli import paging, run_rule_test
from tests.test_shadow_report import firing

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")

PAGE, TICKET = "PsadLatencyBudgetBurn", "PsadLatencyBudgetSlowBurn"
RATE = 600  # /rerank requests per minute (10 per second)


def rerank_traffic(*phases: tuple[int, float]) -> list[dict]:
    """The /rerank histogram's count and its 25 ms bucket, one sample a minute: (minutes, share slower
    than 25 ms) per phase, back to back."""
    count, fast, values = 0, 0, ([], [])
    for minutes, slow in phases:
        for _ in range(minutes):
            values[0].append(str(count))
            values[1].append(str(fast))
            count, fast = count + RATE, fast + round(RATE * (1 - slow))
    name = "psad_request_duration_seconds"
    return [
        {"series": f'{name}_count{{route="/rerank",pod="psad-0"}}', "values": " ".join(values[0])},
        {"series": f'{name}_bucket{{route="/rerank",le="0.025",pod="psad-0"}}', "values": " ".join(values[1])},
    ]


def pages(alert: str, at: str) -> dict:
    """`alert` pages at `at` with its annotations as alerts.yml writes them."""
    groups = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    return paging(alert, at, rule["annotations"]["summary"], rule["annotations"]["description"])


def test_a_fast_burn_pages_and_stops_paging_once_the_short_window_is_clean(tmp_path: Path) -> None:
    """30% slow for 30 minutes (30x the budget), then none: the page fires within minutes, and stops
    once the 30-minute window holds no slow request, while the ticket stays (the budget was spent)."""
    series = rerank_traffic((30, 0.30), (45, 0.0))
    expected = [pages(PAGE, "10m"), pages(PAGE, "40m"), firing(PAGE, "70m", False), firing(TICKET, "70m", True)]
    run_rule_test(tmp_path, series, expected, interval="1m")


def test_a_burn_between_6x_and_14_4x_pages_through_the_6_hour_window(tmp_path: Path) -> None:
    series = rerank_traffic((90, 0.08))
    run_rule_test(tmp_path, series, [pages(PAGE, "60m"), firing(TICKET, "60m", True)], interval="1m")


def test_a_slow_burn_opens_a_ticket_and_does_not_page(tmp_path: Path) -> None:
    series = rerank_traffic((120, 0.02))
    expected = [firing(TICKET, "90m", True), firing(PAGE, "90m", False)]
    run_rule_test(tmp_path, series, expected, interval="1m")


def test_traffic_within_the_budget_alerts_nobody(tmp_path: Path) -> None:
    series = rerank_traffic((400, 0.005))
    expected = [firing(alert, at, False) for alert in (PAGE, TICKET) for at in ("10m", "1h", "6h")]
    run_rule_test(tmp_path, series, expected, interval="1m")


@pytest.mark.parametrize(
    "values",
    ["0x3 1x25", "_x3 1x25"],  # the counter shown at 0 from the start, or appearing with its first refusal
    ids=["counted-from-zero", "series-born-at-refusal"],
)
def test_a_refused_reload_opens_a_ticket_for_15_minutes(tmp_path: Path, values: str) -> None:
    series = [
        {"series": 'psad_model_reload_total{result="refused",pod="psad-0"}', "values": values},
        {"series": 'psad_model_reload_total{result="loaded",pod="psad-0"}', "values": "0+1x28"},
    ]
    alert = "PsadModelReloadRefused"
    expected = [firing(alert, "2m", False), firing(alert, "5m", True), firing(alert, "25m", False)]
    run_rule_test(tmp_path, series, expected, interval="1m")
