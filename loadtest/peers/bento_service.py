"""Peer (b): the reranker as a BentoML 1.4 service, written from BentoML's docs.

A class service whose `rerank` API takes the body's fields as typed parameters (BentoML validates them
with pydantic), one Reranker per worker made in the constructor, the async API awaiting redis-py's
asyncio client with hiredis and calling the model inline, and the access log off (no line per
request, as with the other peers). `workers` is the process count (BentoML's equivalent of uvicorn's
--workers). Run with `bentoml serve loadtest.peers.bento_service:PeerReranker` from the repository
root, in the virtualenv loadtest/peers/venvs.py builds.
"""

from __future__ import annotations

from typing import Any

import bentoml  # type: ignore[import-not-found]  # in the peer's own virtualenv only
from pydantic import BaseModel, Field

from loadtest.peers.work import PeerConfig, Reranker

CONFIG = PeerConfig.from_env()


class Candidate(BaseModel):
    item_id: str = Field(min_length=1)
    score: float


@bentoml.service(workers=CONFIG.workers, logging={"access": {"enabled": False}})
class PeerReranker:
    def __init__(self) -> None:
        self.reranker = Reranker(CONFIG)

    @bentoml.api
    async def rerank(
        self, user_id: str, candidates: list[Candidate], top_k: int | None = None, request_id: str | None = None
    ) -> dict[str, Any]:
        return await self.reranker.rerank(
            user_id, [c.item_id for c in candidates], [c.score for c in candidates], top_k, request_id
        )
