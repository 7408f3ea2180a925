"""`psad shadow report` over parquet results written as the consumer writes them, and the demo's
click generator (loadtest/locustfile.py) that feeds it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import matplotlib.image
import pytest
import typer
import yaml
from click.testing import Result
from typer.testing import CliRunner

from psad.shadow import results
from psad.shadow.report import report_command
from tests.conftest import REPO
from tests.test_service_cli import run_rule_test

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
HOUR = 3600
ITEMS = [f"i{j}" for j in range(5)]


def list_row(record_id: str, *, version: int, tau: float, time: float = T0, **extra: object) -> dict:
    """A lists row; `extra` overrides any column. Measures are given, not derived: the report only
    aggregates what the consumer computed."""
    row = {
        "record_id": record_id,
        "request_id": f"req-{record_id}",
        "time": time,
        "model": "psad",
        "version": version,
        "user_id": f"u-{record_id}",
        "n": 5,
        "k": 3,
        "kendall_tau": tau,
        "topk_overlap": 1.0,
        "ndcg": 1.0,
        "first_agree": True,
        "degraded": False,
        "degraded_reasons": [],
        "items": ITEMS,
        "student_order": [0, 1, 2, 3, 4],
        "teacher_order": [0, 1, 2, 3, 4],
        "served": [0, 1, 2],
        "processed_at": time + 1,
        "consumer": "c1",
    }
    return {**row, **extra}


def click_row(record_id: str, ranks: tuple[int, int, int | None] | None, action: str = "click") -> dict:
    """A clicks row; ranks = (student, teacher, served), or None for an event whose list was not found."""
    student, teacher, served = ranks if ranks else (None, None, None)
    return {
        "record_id": record_id,
        "request_id": f"req-{record_id}",
        "time": T0,
        "user_id": "u1",
        "item_id": "i0",
        "action": action,
        "event_id": f"e-{record_id}",
        "matched": ranks is not None,
        "version": 1 if ranks else None,
        "student_rank": student,
        "teacher_rank": teacher,
        "served_rank": served,
        "processed_at": T0 + 1,
        "consumer": "c1",
    }


@pytest.fixture(scope="module")
def shadow_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 1: four lists (taus 1, 0.5, 0, -0.5; one degraded; one disagreeing on the first item),
    one of them written twice as after a crash; version 2: two lists an hour later; five clicks and two
    views, one of each not matched."""
    root = tmp_path_factory.mktemp("results") / "shadow"
    v1 = [
        list_row("1-0", version=1, tau=1.0, topk_overlap=1.0, ndcg=1.0),
        list_row(
            "2-0", version=1, tau=0.5, topk_overlap=2 / 3, ndcg=0.9, degraded=True, degraded_reasons=["redis_timeout"]
        ),
        list_row("3-0", version=1, tau=0.0, topk_overlap=1 / 3, ndcg=0.5),
        list_row(
            "4-0",
            version=1,
            tau=-0.5,
            topk_overlap=0.0,
            ndcg=0.2,
            first_agree=False,
            student_order=[4, 3, 2, 1, 0],
            teacher_order=[1, 0, 2, 3, 4],
        ),
    ]
    results.write(root, "lists", v1, "c1", HOUR)
    results.write(root, "lists", v1[2:3], "c2", HOUR)  # redelivered after a crash: an identical second part
    v2 = [list_row(f"{i}-1", version=2, tau=0.8, time=T0 + HOUR + i) for i in (5, 6)]
    results.write(root, "lists", v2, "c1", HOUR)
    clicks = [
        click_row("10-0", (1, 3, 1)),  # the teacher ranks it lower
        click_row("11-0", (2, 1, 2)),  # higher
        click_row("12-0", (5, 5, None)),  # equal; not in the served answer
        click_row("13-0", (4, 2, None)),  # higher
        click_row("14-0", None),  # its list was not found
        click_row("15-0", (2, 4, 2), "view"),  # a view, compared apart: the teacher ranks it lower
        click_row("16-0", None, "view"),
    ]
    results.write(root, "clicks", clicks, "c1", HOUR)
    return root


def psad_shadow_report(*args: str) -> Result:
    """`psad shadow report ...` as the root app mounts it."""
    root, shadow = typer.Typer(), typer.Typer()
    shadow.command("report")(report_command)
    root.add_typer(shadow, name="shadow")
    return CliRunner().invoke(root, ["shadow", "report", *args])


def tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table, keyed by its header line, as rows of {column: cell}."""
    out: dict[str, list[dict[str, str]]] = {}
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|--"):
            header = [c.strip() for c in line.strip("|").split("|")]
            rows = []
            for body in lines[i + 2 :]:
                if not body.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in body.strip("|").split(" | ")), strict=True)))
            out[" | ".join(header)] = rows
    return out


def report(shadow_dir: Path, tmp_path: Path, *args: str) -> tuple[str, dict[str, list[dict[str, str]]]]:
    out = tmp_path / "reports" / "shadow.md"
    result = psad_shadow_report("--results", str(shadow_dir), "--out", str(out), *args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    return text, tables(text)


@pytest.fixture(scope="module")
def default_report(shadow_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict, Path]:
    """The report with every default but the paths: its text, tables and directory."""
    out = tmp_path_factory.mktemp("default")
    return (*report(shadow_dir, out), out / "reports")


def test_agreement_per_version_counts_each_record_once(default_report: tuple[str, dict, Path]) -> None:
    text, found, _ = default_report
    summary = found["model | version | lists | degraded | first item agrees"]
    assert summary == [
        {"model": "psad", "version": "1", "lists": "4", "degraded": "25.0%", "first item agrees": "75.0%"},
        {"model": "psad", "version": "2", "lists": "2", "degraded": "0.0%", "first item agrees": "100.0%"},
    ]
    spread = {(r["version"], r["measure"]): r for r in found["model | version | measure | mean | median | p10"]}
    # taus -0.5, 0, 0.5, 1: p10 interpolates 30% of the way from the lowest to the next
    assert spread["1", "Kendall tau"] == {
        "model": "psad",
        "version": "1",
        "measure": "Kendall tau",
        "mean": "0.250",
        "median": "0.250",
        "p10": "-0.350",
    }
    assert (spread["1", "top-k overlap"]["mean"], spread["1", "top-k overlap"]["p10"]) == ("0.500", "0.100")
    assert (spread["1", "NDCG@k"]["median"], spread["2", "Kendall tau"]["p10"]) == ("0.700", "0.800")
    assert "6 lists" in text and "7 events naming a request id" in text
    assert "Degraded reasons: `redis_timeout` (1)." in text
    assert "![" in text and "(shadow.png)" in text


def test_clicks_compare_ranks_per_action_and_say_the_estimate_is_position_biased(
    default_report: tuple[str, dict, Path],
) -> None:
    text, found, _ = default_report
    assert "offline, position-biased estimate" in text and "Users saw the served order" in text
    assert found["action | events | matched | share matched"] == [
        {"action": "click", "events": "5", "matched": "4", "share matched": "80.0%"},
        {"action": "view", "events": "2", "matched": "1", "share matched": "50.0%"},
    ]
    ranks = {(r["action"], r["order"]): r for r in found["version | action | order | events | mean rank | median rank"]}
    assert ranks["click", "student"] == {
        "version": "1",
        "action": "click",
        "order": "student",
        "events": "4",
        "mean rank": "3.000",
        "median rank": "3.000",
    }
    assert (ranks["click", "teacher"]["mean rank"], ranks["click", "teacher"]["median rank"]) == ("2.750", "2.500")
    assert (ranks["click", "served"]["events"], ranks["click", "served"]["mean rank"]) == ("2", "1.500")  # 2 not in it
    assert [ranks["view", order]["mean rank"] for order in ("student", "teacher", "served")] == [
        "2.000",
        "4.000",
        "2.000",
    ]
    votes = {
        r["action"]: r
        for r in found["version | action | events | teacher ranks it higher | equal | student ranks it higher"]
    }
    assert votes["click"] == {
        "version": "1",
        "action": "click",
        "events": "4",
        "teacher ranks it higher": "50.0%",
        "equal": "25.0%",
        "student ranks it higher": "25.0%",
    }
    assert (votes["view"]["events"], votes["view"]["student ranks it higher"]) == ("1", "100.0%")


def test_unmatched_events_are_explained_by_what_can_lose_a_list(default_report: tuple[str, dict, Path]) -> None:
    """The list and its clicks are sampled by the same hash of the request id, so "not sampled" is
    never the reason; what can lose a sampled list's record is."""
    text = " ".join(default_report[0].split())
    assert "not sampled" not in text
    for cause in (
        "dropped or failed at the service's writer",
        "dead-lettered",
        "trimmed",
        "join window",
        "user differs",
    ):
        assert cause in text, cause


def test_the_most_disagreeing_lists_come_first_with_ids_only(shadow_dir: Path, tmp_path: Path) -> None:
    _, found = report(shadow_dir, tmp_path, "--worst", "2")
    worst = next(rows for header, rows in found.items() if header.startswith("record id"))
    assert [r["record id"] for r in worst] == ["4-0", "3-0"]
    assert worst[0] == {
        "record id": "4-0",
        "request id": "req-4-0",
        "user": "u-4-0",
        "model": "psad v1",
        "tau": "-0.500",
        "student's first": "i4, i3, i2",
        "teacher's first": "i1, i0, i2",
    }
    _, none = report(shadow_dir, tmp_path, "--worst", "0")
    assert not any(header.startswith("record id") for header in none)


def test_the_plot_is_a_png_beside_the_report(default_report: tuple[str, dict, Path]) -> None:
    reports = default_report[2]
    image = matplotlib.image.imread(reports / "shadow.png")
    assert image.shape[:2] == (380, 1200)
    assert sorted(p.name for p in reports.iterdir()) == ["shadow.md", "shadow.png"]  # no temporary file left


@pytest.mark.parametrize(
    ("since", "until", "versions"),
    [
        ("2026-01-01T01:00Z", None, ["2"]),  # ISO, the second hour on
        (None, str(int(T0 + HOUR)), ["1"]),  # unix seconds, an exclusive end
        ("2026-01-01T02:00:00+01:00", "2026-01-01T01:00:06", ["2"]),  # a zone; none given: UTC
    ],
)
def test_since_and_until_select_lists_by_answer_time(
    shadow_dir: Path, tmp_path: Path, since: str | None, until: str | None, versions: list[str]
) -> None:
    args = [*(["--since", since] if since else []), *(["--until", until] if until else [])]
    _, found = report(shadow_dir, tmp_path, *args)
    assert [r["version"] for r in found["model | version | lists | degraded | first item agrees"]] == versions


def test_a_range_without_clicks_says_so(shadow_dir: Path, tmp_path: Path) -> None:
    text, found = report(shadow_dir, tmp_path, "--since", "2026-01-01T01:00Z")
    assert "No events in this range" in text and "offline, position-biased estimate" in text
    assert not any(header.startswith(("action", "version | action")) for header in found)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since 'yesterday': expected an ISO 8601 time"),
        (["--until", "nan"], "--until 'nan': expected a time after 1970"),
        (["--since", "2026-01-02", "--until", "2026-01-01"], "--since 2026-01-02 is not before --until 2026-01-01"),
        (["--since", "2027-01-01"], "no shadow lists in"),
    ],
)
def test_bad_or_empty_ranges_fail_with_one_line_and_exit_2(
    shadow_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = psad_shadow_report("--results", str(shadow_dir), "--out", str(tmp_path / "r.md"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r.md").exists()


def test_a_missing_results_directory_is_named(tmp_path: Path) -> None:
    result = psad_shadow_report("--results", str(tmp_path / "absent"), "--out", str(tmp_path / "r.md"))
    assert result.exit_code == 2
    assert f"--results {tmp_path / 'absent'}: no such directory" in result.output


CLICKS = """
import json
import loadtest.locustfile as lf
lf.RECENT.append(("req-a", "u-a", [f"i{j}" for j in range(10)]))
print(json.dumps([lf.click_event() for _ in range(4000)]))
"""


@pytest.mark.parametrize("bias", ["1", "0"])
def test_locust_clicks_name_a_recent_answer_with_a_position_bias(bias: str) -> None:
    """The load test's events act on answers it received: their request id and user, and items
    drawn with probability 1/rank**bias (run in a subprocess: importing locust patches gevent)."""
    env = {**os.environ, "PSAD_LOADTEST_LIST_LENGTH": "10", "PSAD_LOADTEST_CLICK_BIAS": bias}
    env.pop("PSAD_LOADTEST_DATA", None)
    done = subprocess.run([sys.executable, "-c", CLICKS], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    clicks = json.loads(done.stdout.splitlines()[-1])
    assert {(c["request_id"], c["user_id"]) for c in clicks} == {("req-a", "u-a")}
    counts = Counter(int(c["item_id"][1:]) + 1 for c in clicks)  # by rank
    if bias == "1":  # expected share of rank r: (1/r) / H(10), H(10) = 2.93
        assert counts[1] > 1100 and counts[10] < 250 and counts[1] > 3 * counts[5]
    else:
        assert all(300 < counts[r] < 500 for r in range(1, 11)), counts


@pytest.mark.parametrize(("actions", "expected"), [(["view", "click"], "click"), (["clickout", "image"], "clickout")])
def test_locust_posts_clicks_when_the_data_set_has_them_else_its_first_action(
    tmp_path: Path, actions: list[str], expected: str
) -> None:
    import pandas as pd

    pd.DataFrame({"user_id": ["u1"]}).to_parquet(tmp_path / "users.parquet")
    pd.DataFrame({"item_id": ["i1", "i2"]}).to_parquet(tmp_path / "items.parquet")
    (tmp_path / "schema.json").write_text(json.dumps({"actions": actions}))
    env = {**os.environ, "PSAD_LOADTEST_DATA": str(tmp_path), "PSAD_LOADTEST_LIST_LENGTH": "2"}
    env.pop("PSAD_LOADTEST_ACTION", None)
    code = "import loadtest.locustfile as lf; print(lf.ACTION)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == expected


def test_locust_refuses_a_bad_click_bias() -> None:
    env = {**os.environ, "PSAD_LOADTEST_CLICK_BIAS": "-1"}
    env.pop("PSAD_LOADTEST_DATA", None)
    done = subprocess.run(
        [sys.executable, "-c", "import loadtest.locustfile"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode != 0
    assert "PSAD_LOADTEST_CLICK_BIAS=-1.0: expected a number >= 0.0" in done.stderr


# The demo and the deployment around the consumer -------------------------------------------------


def test_the_commands_psad_up_prints_parse_against_the_real_cli(tmp_path: Path) -> None:
    from psad.shadow.cli import shadow_app
    from psad.up import shadow_hint

    hint = shadow_hint(0.1, "redis://127.0.0.1:6379/0", "psad", Path("models"))
    lines = [line.split("#")[0].split() for line in hint.splitlines()[1:]]
    assert [words[:3] for words in lines] == [["psad", "shadow", "run"], ["psad", "shadow", "report"]]
    run, report = typer.Typer(), typer.Typer()
    run.add_typer(shadow_app, name="shadow")
    reports = typer.Typer()
    reports.command("report")(report_command)
    report.add_typer(reports, name="shadow")
    for app, words in zip((run, report), lines, strict=True):  # an unknown flag fails before --help acts
        result = CliRunner().invoke(app, [*words[1:], "--help"])
        assert result.exit_code == 0, (words, result.output)
    assert "off" in shadow_hint(0.0, "redis://x", "psad", Path("models"))


DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"


def exported(registry_metrics: list) -> set[str]:
    """The sample names collectors expose (a counter's _total, a histogram's series)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    return {m.name + s for m in registry_metrics for s in suffixes.get(m.type, [""])}


def shadow_panels() -> list[dict]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (row,) = [i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Shadow evaluation"]
    return panels[row + 1 :]


def test_the_shadow_row_queries_what_the_consumer_and_the_service_export() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from psad.shadow.consumer import Metrics
    from service import metrics

    consumer = exported(list(Metrics().registry.collect()))
    service = exported([m for o in vars(metrics).values() if isinstance(o, MetricWrapperBase) for m in o.collect()])
    panels = shadow_panels()
    queried = {m for p in panels for t in p["targets"] for m in re.findall(r"\bpsad_[a-z_]+", t["expr"])}
    assert queried <= consumer | service, queried - consumer - service
    for needed in ("kendall_tau_bucket", "topk_overlap_bucket", "ndcg_bucket", "first_item_agreement_total"):
        assert f"psad_shadow_{needed}" in queried
    assert {"psad_shadow_click_rank_bucket", "psad_shadow_dead_letters_total", "psad_shadow_lag"} <= queried
    assert "psad_shadow_pending" in queried and "psad_shadow_records_total" in queried & service
    assert "psad_shadow_trimmed_total" in queried
    # events carry an action label: ranks are summed over the picked actions, by order; counts kept by action
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    ranks = [e for e in exprs if "psad_shadow_click_rank" in e]
    assert ranks and all('{action=~"$action"}' in e and re.search(r"by \((le, )?order\)", e) for e in ranks), ranks
    assert any("by (action, matched)" in e for e in exprs if "psad_shadow_clicks_total" in e)
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert "psad_shadow_click_rank_bucket, action" in variables["action"]["definition"]
    assert {p["datasource"]["uid"] for p in panels} == {"psad-prometheus"}


def test_dashboard_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], int] = {}
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['id']} overlaps panel {cells[x, y]}"
                cells[x, y] = p["id"]
    assert max(x for x, _ in cells) < 24


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")


@needs_promtool
def test_the_shadow_row_parses_as_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"check_{p['id']}_{t['refId']}", "expr": t["expr"].replace("$__rate_interval", "1m")}
        for p in shadow_panels()
        for t in p["targets"]
    ]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "shadow", "rules": rules}]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def alert_test(tmp_path: Path, series: list[dict], expected: list[dict]) -> None:
    """promtool's rule unit test of deploy/alerts.yml, series sampled every minute."""
    run_rule_test(tmp_path, series, expected, interval="1m")


def firing(alert: str, at: str, fires: bool, labels: dict | None = None) -> dict:
    """An expectation on `alert` at `at`: firing as a ticket, with its annotations as alerts.yml
    writes them (the reason label filled in), or silent."""
    if not fires:
        return {"eval_time": at, "alertname": alert, "exp_alerts": []}
    groups = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())["groups"]
    (rule,) = [r for g in groups for r in g["rules"] if r.get("alert") == alert]
    labels = labels or {}
    annotations = {
        k: v.replace("{{ $labels.reason }}", labels.get("reason", "")) for k, v in rule["annotations"].items()
    }
    expected = {"exp_labels": {"severity": "ticket", **labels}, "exp_annotations": annotations}
    return {"eval_time": at, "alertname": alert, "exp_alerts": [expected]}


@needs_promtool
def test_shadow_alerts_fire_on_lost_records_and_an_absent_consumer(tmp_path: Path) -> None:
    """Per minute: the service writes 600 records; from minute 20 it also drops 12 (2%), and from
    minute 40 a consumer compares 60 lists."""
    series = [
        {"series": 'psad_shadow_records_total{result="written"}', "values": "0+600x80"},
        {"series": 'psad_shadow_records_total{result="dropped"}', "values": "0x20 0+12x60"},
        {"series": 'psad_shadow_records_total{result="failed"}', "values": "0x80"},
        {"series": 'psad_shadow_lists_total{version="1"}', "values": "0x40 0+60x40"},
    ]
    expected = [
        firing("PsadShadowRecordsLost", "18m", False),
        firing("PsadShadowRecordsLost", "35m", True),
        firing("PsadShadowNotConsumed", "10m", False),  # not for 15 minutes yet
        firing("PsadShadowNotConsumed", "30m", True),
        firing("PsadShadowNotConsumed", "60m", False),  # the consumer runs
    ]
    alert_test(tmp_path, series, expected)


@needs_promtool
def test_the_dead_letter_alert_names_its_reason(tmp_path: Path) -> None:
    series = [
        {"series": 'psad_shadow_dead_letters_total{reason="version"}', "values": "0x10 1+1x30"},
        {"series": 'psad_shadow_dead_letters_total{reason="record"}', "values": "0x40"},
        {"series": "psad_shadow_lag", "values": "20000x40"},
    ]
    expected = [
        firing("PsadShadowDeadLetters", "30m", True, {"reason": "version"}),
        firing("PsadShadowConsumerBehind", "10m", False),
        firing("PsadShadowConsumerBehind", "30m", True),
    ]
    alert_test(tmp_path, series, expected)


@needs_promtool
def test_records_trimmed_unprocessed_raise_their_own_alert(tmp_path: Path) -> None:
    series = [
        {"series": "psad_shadow_trimmed_total", "values": "0x10 5+5x30"},
        {"series": 'psad_shadow_dead_letters_total{reason="record"}', "values": "0x40"},
    ]
    expected = [
        firing("PsadShadowRecordsTrimmed", "10m", False),
        firing("PsadShadowRecordsTrimmed", "30m", True),
        firing("PsadShadowDeadLetters", "30m", False),  # trimmed records are not dead letters
    ]
    alert_test(tmp_path, series, expected)


def test_the_docs_name_the_dashboard_and_its_row_as_the_dashboard_does() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (row,) = [p["title"] for p in dashboard["panels"] if p["type"] == "row" and p["title"].startswith("Shadow")]
    for doc in (REPO / "docs" / "shadow.md", REPO / "docker-compose.yml"):
        text = " ".join(doc.read_text().split())
        assert f'dashboard "{dashboard["title"]}"' in text and f'row "{row}"' in text, doc
        assert not re.search(r"row [\"']Shadow[\"']", text), doc


def test_compose_runs_the_consumer_image_against_the_service_stream_and_prometheus_finds_it() -> None:
    from psad.shadow.cli import shadow_app

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    dockerfile = (REPO / "Dockerfile").read_text()
    services = compose["services"]
    shadow = services["shadow"]
    assert shadow["build"]["target"] == "shadow"
    stage = dockerfile.split("AS shadow\n", 1)[1].split("\nFROM ", 1)[0]
    assert "download.pytorch.org/whl/cpu" in stage and '".[train]"' in stage
    assert f"CMD {json.dumps(shadow['command'])}" in stage  # the image alone runs what compose runs
    app = typer.Typer()
    app.add_typer(shadow_app, name="shadow")
    assert CliRunner().invoke(app, [*shadow["command"][1:], "--help"]).exit_code == 0
    # the same Redis, key prefix and bundles as the service, which sampling is switched on for
    assert shadow["environment"].items() <= services["psad"]["environment"].items()
    assert "PSAD_SHADOW_SAMPLE_RATE" in services["psad"]["environment"]
    models = [v for v in shadow["volumes"] if v.endswith(":/models:ro")]
    assert models and shadow["environment"]["PSAD_MODEL_REPO"] == "/models"
    out = shadow["command"][shadow["command"].index("--out") + 1]
    assert any(v.split(":")[1] == out and v.split(":")[0] in compose["volumes"] for v in shadow["volumes"])
    port = int(shadow["command"][shadow["command"].index("--metrics-port") + 1])
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "psad-shadow"]
    assert job["dns_sd_configs"] == [{"names": ["shadow"], "type": "A", "port": port}]
