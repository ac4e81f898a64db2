"""Collocated: one plain vLLM engine runs both phases of a request, as ordinary replicas do. The baseline.

`build_app` starts these instead of prefill and decode when `mode: collocated`; the router in front is the same,
so a comparison between the modes measures the split, not the rest of the serving path.

1. The router sends the user's typed request (chat or completion) unchanged.
2. vLLM's serving layer validates, renders and runs it: prompt and decode on this replica's engine, no connector.
3. Tokens flow back as vLLM's own SSE strings (streaming) or one response object, exactly as decode returns them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from deployments.engine import Engine
from deployments.engine_counters import EngineCounters
from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class CollocatedServer:
    async def __init__(self, config: AppConfig):
        rank = serve.get_replica_context().rank.local_rank
        self.engine_id = f"collocated-{rank}-{uuid.uuid4().hex[:8]}"
        self._engine = await Engine.start(config.model, config.collocated, replica_rank=rank, role_name="collocated")
        logger.info("collocated engine %s ready", self.engine_id)

    async def generate(self, request: Any) -> AsyncGenerator[Any, None]:
        """Yields vLLM's SSE strings when `request.stream`, else one response; or one ErrorResponse."""
        logger.info("request %s: prompt and decode on %s", request.request_id, self.engine_id)
        result = await self._engine.generate(request)
        if isinstance(result, AsyncGenerator):
            async for chunk in result:
                yield chunk
        else:
            yield result

    def counters(self) -> EngineCounters:
        return self._engine.counters()

    def role(self) -> dict[str, Any]:
        return {"role": "collocated", "engine_id": self.engine_id, "is_engine_alive": self._engine.is_alive}

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
