"""Collocated: one plain vLLM engine runs both phases of a request, as ordinary replicas do. The baseline.

`build_app` starts these instead of prefill and decode when `mode: collocated`; the router in front is the same,
so a comparison between the modes measures the split, not the rest of the serving path.

1. The router's hand-off (handoff.py, `CollocatedHandoff`) sends the user's typed request unchanged.
2. vLLM's serving layer validates, renders and runs it: prompt and decode on this replica's engine, no connector.
3. Tokens flow back as vLLM's own SSE strings (streaming) or one response object, exactly as decode returns them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from deployments.engine_server import HEALTH_CHECK, EngineServer
from deployments.messages import OpenAIRequest
from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(**HEALTH_CHECK)
class CollocatedServer(EngineServer):
    role_name = "collocated"

    async def __init__(self, config: AppConfig):
        rank = self._name_engine()
        await self._start_engine(config, config.collocated, rank)
        logger.info("collocated engine %s ready", self.engine_id)

    async def generate(self, request: OpenAIRequest) -> AsyncGenerator[Any, None]:
        """Yields vLLM's SSE strings when `request.stream`, else one response; or one ErrorResponse."""
        logger.info("request %s: prompt and decode on %s", request.request_id, self.engine_id)
        async for answer in self._answers(await self._engine.generate(request)):
            yield answer
