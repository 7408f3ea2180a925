"""URL model repositories against a real S3-compatible server (moto's server mode, through s3fs):
the service starts from s3://, serves /rerank, polls and reloads new uploads, and keeps serving
through a tampered upload or an unreachable bucket."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import moto.server as moto_server
import pytest
import s3fs

from export.contract.bundle import MANIFEST_FILE, BundleError
from psad.procs import free_port
from service.model_repo import RemoteRepo
from service.model_store import ModelStore
from service.settings import Settings, load_settings
from tests.test_service_api import loaded_data, request, serve, settings_for

ADMIN = {"Authorization": "Bearer secret"}


@pytest.fixture(scope="module")
def data(tiny_data: Path, redis_server) -> dict:  # noqa: ANN001 - a RedisServer
    return loaded_data(tiny_data, redis_server.url)


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[object, str]:
    """A fresh bucket named after the test, and an s3fs client of it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    bucket = request.node.name.replace("_", "-").lower()[:60]
    fs.mkdir(bucket)
    return fs, bucket


def upload(fs: object, bundle: Path, bucket: str, version: int) -> None:
    """A bundle uploaded as `psad/<version>/`, its manifest last (what makes a version complete);
    the manifest's version is rewritten to match, as `psad export --version` would have written it."""
    for file in sorted(bundle.iterdir(), key=lambda f: f.name == MANIFEST_FILE):
        raw = file.read_bytes()
        if file.name == MANIFEST_FILE:
            raw = json.dumps({**json.loads(raw), "version": version}).encode()
        fs.pipe_file(f"{bucket}/repo/psad/{version}/{file.name}", raw)  # type: ignore[attr-defined]


def s3_settings(endpoint: str, url: str, cache: Path) -> Settings:
    options = {"endpoint_url": endpoint}
    return load_settings(model_repo=url, model_repo_options=options, model_cache_dir=cache, device="cpu")


def wait_for_version(client, version: int) -> int:  # noqa: ANN001 - an httpx.Client
    for _ in range(400):
        served = client.get("/readyz").json()["model"]["version"]
        if served == version:
            break
        time.sleep(0.05)
    return served


def test_starts_from_s3_and_reuses_the_cache(s3, endpoint, tiny_bundle, tmp_path):
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    settings = s3_settings(endpoint, f"s3://{bucket}/repo", tmp_path / "cache")
    assert asyncio.run(ModelStore(settings).start()).version == 1
    (cached,) = (tmp_path / "cache").glob("*/psad/1/model.onnx")  # one directory per repository URL
    inode = cached.stat().st_ino
    asyncio.run(ModelStore(settings).start())
    assert cached.stat().st_ino == inode  # served from the cache, not downloaded again


def test_a_version_uploaded_again_is_downloaded_again(s3, endpoint, tiny_bundle, tmp_path):
    """Versions should be immutable; one deleted and uploaded again is not served from a stale copy."""
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    settings = s3_settings(endpoint, f"s3://{bucket}/repo", tmp_path / "cache")
    asyncio.run(ModelStore(settings).start())
    manifest = json.loads(fs.cat_file(f"{bucket}/repo/psad/1/{MANIFEST_FILE}"))
    fs.pipe_file(f"{bucket}/repo/psad/1/{MANIFEST_FILE}", json.dumps({**manifest, "note": "again"}).encode())
    asyncio.run(ModelStore(settings).start())
    (cached,) = (tmp_path / "cache").glob(f"*/psad/1/{MANIFEST_FILE}")
    assert json.loads(cached.read_text())["note"] == "again"  # the new upload, not the stale copy


def test_a_pinned_version_starts_from_the_cache_while_the_store_is_unreachable(s3, endpoint, tiny_bundle, tmp_path):
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    url = f"s3://{bucket}/repo"
    cache = tmp_path / "cache"
    asyncio.run(ModelStore(s3_settings(endpoint, url, cache)).start())  # downloaded and verified once
    pinned = load_settings(
        model_repo=url, model_repo_options={"endpoint_url": "http://127.0.0.1:9"}, model_cache_dir=cache,
        model_version="1", device="cpu",
    )  # fmt: skip
    assert asyncio.run(ModelStore(pinned).start()).version == 1  # nothing listens on port 9


def test_tampered_file_is_refused_and_removed(s3, endpoint, tiny_bundle, tmp_path):
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    upload(fs, tiny_bundle, bucket, 2)
    fs.pipe_file(f"{bucket}/repo/psad/2/vocab.json", b"{}")
    store = ModelStore(s3_settings(endpoint, f"s3://{bucket}/repo", tmp_path / "cache"))
    with pytest.raises(BundleError, match="vocab.json"):
        asyncio.run(store.start())
    assert not list((tmp_path / "cache").glob("*/psad/2"))


def test_missing_bucket_names_the_variable(s3, endpoint, tmp_path):
    store = ModelStore(s3_settings(endpoint, "s3://no-such-bucket-psad/repo", tmp_path / "cache"))
    with pytest.raises(BundleError, match="PSAD_MODEL_REPO=s3://no-such-bucket-psad/repo: not found"):
        asyncio.run(store.start())


def test_an_unknown_protocol_says_what_to_install(tmp_path):
    with pytest.raises(BundleError, match=r"PSAD_MODEL_REPO=nosuch://x.*psad\[remote\]"):
        RemoteRepo("nosuch://x", {}, tmp_path)


def test_concurrent_downloads_of_one_version_leave_one_complete_copy(s3, endpoint, tiny_bundle, tmp_path):
    """Workers of one server share the cache: each downloads, the first rename wins, none fails."""
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    url = f"s3://{bucket}/repo"
    options = {"endpoint_url": endpoint}
    repos = [RemoteRepo(url, options, tmp_path / "cache") for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda r: r.fetch("psad", 1), repos))
    assert len(set(paths)) == 1
    names = sorted(p.name for p in paths[0].iterdir())
    assert names == sorted(p.name for p in tiny_bundle.iterdir())
    assert [p.name for p in paths[0].parent.iterdir()] == ["1"]  # no temp directory left behind


def test_serves_from_s3_polls_new_uploads_and_keeps_serving_through_a_bad_one(
    s3, endpoint, tiny_bundle, tmp_path, redis_server, data
):
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    url = f"s3://{bucket}/repo"
    options = {"endpoint_url": endpoint}
    settings = settings_for(
        url, redis_server.url, model_repo_options=options, model_cache_dir=tmp_path / "cache", poll_interval_s=0.05,
        admin_token="secret",
    )  # fmt: skip
    with serve(settings) as c:
        answer = c.post("/rerank", json=request(data))
        assert answer.status_code == 200 and answer.json()["degraded"] is False
        assert answer.json()["model_version"] == "1"

        upload(fs, tiny_bundle, bucket, 2)  # picked up by polling
        assert wait_for_version(c, 2) == 2
        assert c.post("/rerank", json=request(data)).json()["model_version"] == "2"

        upload(fs, tiny_bundle, bucket, 3)
        fs.pipe_file(f"{bucket}/repo/psad/3/model.onnx", b"not a model")
        refused = c.post("/admin/reload", headers=ADMIN)
        assert refused.status_code == 409 and refused.json()["result"] == "refused"
        assert "model.onnx" in refused.json()["detail"]
        assert c.post("/rerank", json=request(data)).json()["model_version"] == "2"

        reload = c.post("/admin/reload", json={"version": 1}, headers=ADMIN)  # a rollback, from the cache
        assert reload.status_code == 200 and reload.json()["version"] == 1


def test_an_unreachable_bucket_is_logged_once_and_polling_resumes(s3, endpoint, tiny_bundle, tmp_path, caplog):
    fs, bucket = s3
    upload(fs, tiny_bundle, bucket, 1)
    store = ModelStore(s3_settings(endpoint, f"s3://{bucket}/repo", tmp_path / "cache"))

    async def scenario() -> int:
        await store.start()
        poller = asyncio.create_task(store.poll(0.02))
        fs.rm(f"{bucket}", recursive=True)  # the bucket gone: every listing fails
        await asyncio.sleep(0.5)
        fs.mkdir(bucket)
        upload(fs, tiny_bundle, bucket, 2)
        for _ in range(200):
            if store.current.version == 2:
                break
            await asyncio.sleep(0.05)
        poller.cancel()
        return store.current.version

    with caplog.at_level(logging.INFO, logger="psad.service"):
        assert asyncio.run(scenario()) == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("model repository poll failed") == 1
    assert "model repository readable again" in messages
