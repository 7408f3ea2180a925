"""Peer (a): the reranker as a competent engineer writes it from the FastAPI and redis-py docs.

FastAPI's own body handling (a pydantic model for the request and, as the return type, /rerank's own
response model, which FastAPI then serialises straight to JSON bytes), an async route awaiting redis-py's asyncio
client with hiredis, the model called inline (a call of under a millisecond: a thread hop would cost
more than it frees), one Reranker per worker process, made in the lifespan. Run by uvicorn:
`uvicorn loadtest.peers.fastapi_app:app --workers 2` (uvloop and httptools, uvicorn's defaults when
installed). The `fastapi-gc` peer is the same app with PSAD_PEER_GC_FREEZE=1: two lines that freeze
the startup heap out of the garbage collector, as our service does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from pydantic import BaseModel, Field

from loadtest.peers.work import PeerConfig, Reranker
from service.api import RerankResponse  # /rerank's response model: the same fields by construction


class Candidate(BaseModel):
    item_id: str = Field(min_length=1)
    score: float


class RerankRequest(BaseModel):
    user_id: str = Field(min_length=1)
    candidates: list[Candidate] = Field(min_length=1)
    top_k: int | None = Field(None, ge=1)
    request_id: str | None = None


state: dict[str, Reranker] = {}


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    state["reranker"] = Reranker(PeerConfig.from_env())
    state["reranker"].ready()
    yield
    await state.pop("reranker").aclose()


app = FastAPI(lifespan=lifespan)


@app.post("/rerank")
async def rerank(request: RerankRequest) -> RerankResponse:
    cands = request.candidates
    answer = await state["reranker"].rerank(
        request.user_id, [c.item_id for c in cands], [c.score for c in cands], request.top_k, request.request_id
    )
    return RerankResponse.model_validate(answer)
