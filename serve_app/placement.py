"""Where each role's replicas run: its placement in the config, as Serve's `ray_actor_options`, checked by Ray's own
rules when the app is built (a bad label selector or resource name stops the start-up with Ray's message and the
role's name, instead of leaving the deployment waiting for a node that cannot exist).

Apart from config.py, which stays free of Ray: the scheduler and the simulator import the config without Ray.
"""

from __future__ import annotations

from typing import Any

from ray._common.ray_option_utils import validate_actor_options  # Ray's own option rules (ray is pinned)

from serve_app.config import EngineRoleConfig


def ray_actor_options(role_name: str, role: EngineRoleConfig) -> dict[str, Any]:
    options = role.ray_actor_options
    try:
        validate_actor_options(options, in_options=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{role_name}: {error}") from None
    return options
