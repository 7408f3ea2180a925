"""Peer (d): the reranker as a LitServe API, written from LitServe's docs.

`python -m loadtest.peers.litserve_app --port P`: an async LitAPI (enable_async: decode, predict and
encode are coroutines) whose `setup` makes one Reranker per inference worker, `workers_per_device`
inference workers on the CPU and, LitServe's default, as many HTTP server processes as inference
workers, handing each request to a worker over LitServe's queues.

No `from __future__ import annotations` here: LitServe reads decode_request's annotation at run time
to know the body is JSON (a string annotation would make it a query parameter).
"""

import argparse
from typing import Any

import litserve as ls  # type: ignore[import-not-found]  # in the peer's own virtualenv only

from loadtest.peers.work import PeerConfig, Reranker
from psad.procs import LOOPBACK


class PeerAPI(ls.LitAPI):  # type: ignore[misc]  # an untyped base class
    def setup(self, device: str) -> None:
        self.reranker = Reranker(PeerConfig.from_env())

    async def decode_request(self, request: dict[str, Any]) -> dict[str, Any]:
        return request

    async def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        cands = body["candidates"]
        return await self.reranker.rerank(
            body["user_id"],
            [c["item_id"] for c in cands],
            [c["score"] for c in cands],
            body.get("top_k"),
            body.get("request_id"),
        )

    async def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


def main(port: int) -> None:
    """Serve the peer on 127.0.0.1:PORT."""
    workers = PeerConfig.from_env().workers
    server = ls.LitServer(PeerAPI(api_path="/rerank", enable_async=True), accelerator="cpu", workers_per_device=workers)
    server.run(host=LOOPBACK, port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="port of LitServe's HTTP servers")
    main(parser.parse_args().port)
