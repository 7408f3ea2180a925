"""Peer (c): the reranker as a Ray Serve deployment behind Ray's HTTP proxy, written from Ray Serve's docs.

`python -m loadtest.peers.ray_app --port P` starts a local Ray instance with as many CPUs as the peer
has workers, the HTTP proxy on 127.0.0.1:P and one replica per worker (one CPU each), each with its
own Reranker, access logs off; a replica's async `__call__` reads the JSON body from the Starlette request (Ray's
first HTTP example) and answers a Starlette JSONResponse (a returned dict would be sent chunked,
without the Content-Length the load generator reads). It then waits
until it is stopped (SIGTERM shuts Serve and Ray down).
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any

from ray import serve  # type: ignore[import-not-found]  # in the peer's own virtualenv only

from loadtest.peers.work import PeerConfig, Reranker
from psad.procs import LOOPBACK


class PeerReranker:
    def __init__(self, config: PeerConfig) -> None:
        self.reranker = Reranker(config)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse  # Ray Serve's dependency

        body = await request.json()
        cands = body["candidates"]
        answer = await self.reranker.rerank(
            body["user_id"],
            [c["item_id"] for c in cands],
            [c["score"] for c in cands],
            body.get("top_k"),
            body.get("request_id"),
        )
        return JSONResponse(answer)


def main(port: int) -> None:
    """Serve the peer on 127.0.0.1:PORT until SIGTERM."""
    import ray  # type: ignore[import-not-found]

    config = PeerConfig.from_env()
    ray.init(num_cpus=config.workers, include_dashboard=False, log_to_driver=False)
    quiet = {"enable_access_log": False, "log_level": "WARNING"}  # no log line per request, as for the others
    serve.start(http_options={"host": LOOPBACK, "port": port}, logging_config=quiet)
    deployment = serve.deployment(num_replicas=config.workers, ray_actor_options={"num_cpus": 1})(PeerReranker)
    app = deployment.bind(config)
    serve.run(app, route_prefix="/rerank", logging_config=quiet)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port of Ray Serve's HTTP proxy")
    main(parser.parse_args().port)
