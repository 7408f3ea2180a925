"""What a route depends on: the Service the lifespan builds, and the dependency that hands it over."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import Request

from service.health import StoreHealth
from service.inference import Reranker
from service.model_store import ModelStore
from service.profiles import ProfileStore
from service.settings import Settings
from service.shadow import ShadowWriter


@dataclass
class Service:
    """Everything a route needs, created by the lifespan and kept on app.state.service."""

    settings: Settings
    models: ModelStore
    profiles: ProfileStore
    reranker: Reranker
    log: logging.Logger
    health: StoreHealth
    shadow: ShadowWriter | None = None  # None: shadow sampling is off


def service(request: Request) -> Service:
    return request.app.state.service
