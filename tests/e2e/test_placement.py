"""A placement no node of the cluster can take is refused at start-up with its reason, not left deploying.

1. serve_config.yaml with prefill asking for a GPU, on this CPU-only host: the app's build stops with the role, what
   it asks and what the node has (serve_app/placement.py), and `serve run` reports it within seconds of the build,
   where Serve alone would keep the deployment DEPLOYING for ever. The app is built once: the error is one Serve
   does not retry (serve_app/builder.py's AppConfigError), since no retry could fix it.
2. Nothing is left running: `serve_run` stops the head and everything it started on the way out.
"""

from __future__ import annotations

import time

import pytest

from bench import processes
from tests.conftest import TEST_OVERRIDES

REFUSED_WITHIN_S = 180  # a Ray head and one build of the app; no engine starts


def test_gpus_asked_on_a_cpu_only_cluster_stop_the_start_up_with_the_reason(logs_dir):
    from bench.systems import serve_config

    config = serve_config(**TEST_OVERRIDES)
    config["applications"][0]["args"]["prefill"]["num_gpus"] = 1
    began = time.monotonic()
    with pytest.raises(RuntimeError, match=r"the app failed to deploy: .*prefill: no live node can take a replica "
                                           r"that asks for GPU 1; the nodes have: .*GPU 0"):
        with processes.serve_run(config, name="unplaceable", logs_dir=logs_dir, startup_timeout_s=REFUSED_WITHIN_S):
            pass
    assert time.monotonic() - began < REFUSED_WITHIN_S
    serve_log = (logs_dir / "serve-run-unplaceable.log").read_text(errors="replace")
    assert serve_log.count("Importing application 'splitserve'") == 1, serve_log[-3000:]
