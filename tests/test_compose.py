"""docker-compose.yml's hardening, read from the file itself (no Docker engine runs here): what a
host can reach without credentials, the Grafana password, and the resource limits."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
QUANTITY = re.compile(r"^(\$\{[A-Z_]+:-)?[0-9.]+[kmg]?\}?$")


def test_redis_and_prometheus_are_not_reachable_from_other_hosts() -> None:
    assert "ports" not in SERVICES["redis"]  # no password: inside the compose network only
    for port in SERVICES["prometheus"]["ports"]:
        assert port.startswith("127.0.0.1:"), port  # no authentication: this host only


def test_grafana_refuses_to_start_without_an_admin_password() -> None:
    password = SERVICES["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?.+\}", password), password  # `:?`: an error, no default


def test_every_container_has_cpu_and_memory_limits() -> None:
    for name, service in SERVICES.items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory"} <= limits.keys(), name
        assert all(QUANTITY.match(str(v)) for v in limits.values()), (name, limits)
