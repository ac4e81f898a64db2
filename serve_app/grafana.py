"""splitserve's Grafana dashboard (dashboards/splitserve_grafana_dashboard.json), where Ray's Grafana finds it.

Ray writes its own dashboards into `<session>/metrics/grafana/dashboards/` (or $RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR)
and provisions Grafana to load every JSON in that folder. The router copies ours there when it starts, so a
Grafana started the way Ray documents (`grafana-server --config <session>/metrics/grafana/grafana.ini`) shows it
next to Ray's. For a Grafana of your own, import the JSON file; it asks for a Prometheus data source.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger("ray.serve")

DASHBOARD_JSON = Path(__file__).parent / "dashboards" / "splitserve_grafana_dashboard.json"


def ray_dashboards_dir() -> Path | None:
    """The folder Ray's provisioned Grafana loads dashboards from, on this node; None outside a Ray node."""
    if os.environ.get("RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"):
        return Path(os.environ["RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"])
    import ray

    node = ray._private.worker._global_node  # Ray has no public accessor for the session folder
    if node is None:
        return None
    return Path(node.get_session_dir_path()) / "metrics" / "grafana" / "dashboards"


def install_dashboard() -> Path | None:
    """Copies the dashboard into Ray's Grafana folder; returns where, or None if there is none on this node."""
    folder = ray_dashboards_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / DASHBOARD_JSON.name
        shutil.copyfile(DASHBOARD_JSON, target)
    except OSError as exc:  # a read-only session folder must not stop the app
        logger.warning("could not install the Grafana dashboard into %s: %s", folder, exc)
        return None
    logger.info("Grafana dashboard installed: %s", target)
    return target
