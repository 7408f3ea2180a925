"""docs/service.md's settings table is the one the settings describe: a new or changed setting
cannot ship with the docs saying something else."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import ENV_PREFIX, Settings, SettingsError, load_settings, settings_table
from tests.conftest import REPO


def test_every_setting_is_described() -> None:
    missing = [name for name, field in Settings.model_fields.items() if not field.description]
    assert missing == []


def test_the_docs_hold_the_table_the_settings_make() -> None:
    docs = (REPO / "docs" / "service.md").read_text()
    table = settings_table()
    assert table in docs, f"docs/service.md's settings table differs; replace it with:\n\n{table}"
    rows = [line for line in table.splitlines() if line.startswith(f"| `{ENV_PREFIX}")]
    assert len(rows) == len(Settings.model_fields)


def test_an_empty_admin_token_disables_admin() -> None:
    """docker-compose passes `PSAD_ADMIN_TOKEN: ${PSAD_ADMIN_TOKEN:-}`: unset there must not mean a
    token of "" (which `Authorization: Bearer ` would never match, answering 'wrong token')."""
    assert Settings(admin_token="").admin_token is None
    assert Settings(admin_token="  ").admin_token is None
    token = Settings(admin_token="s3cret").admin_token
    assert token is not None and token.get_secret_value() == "s3cret"


def test_repository_options_that_are_not_json_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PSAD_MODEL_REPO_OPTIONS", "endpoint_url=http://minio:9000")
    with pytest.raises(SettingsError, match="PSAD_MODEL_REPO_OPTIONS: not valid JSON"):
        load_settings()
    monkeypatch.setenv("PSAD_MODEL_REPO_OPTIONS", '["http://minio:9000"]')
    with pytest.raises(SettingsError, match="PSAD_MODEL_REPO_OPTIONS=.*valid dictionary"):
        load_settings()
    monkeypatch.setenv("PSAD_MODEL_REPO_OPTIONS", '{"endpoint_url": "http://minio:9000"}')
    assert load_settings().model_repo_options == {"endpoint_url": "http://minio:9000"}


def test_a_repository_is_a_path_or_a_url_kept_as_written() -> None:
    assert load_settings(model_repo=Path("models")).model_repo == "models"
    assert load_settings(model_repo="s3://bucket/a//b").model_repo == "s3://bucket/a//b"  # no path normalisation
