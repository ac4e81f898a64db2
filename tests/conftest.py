"""Session fixtures: the real app, started once from serve_config.yaml and shared by every end-to-end test.

Order matters on a 2-core host: the standalone reference engine (for the exactness test) runs first and is
stopped before the app's two engines start, so no test measures engines fighting for cores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench import processes
from bench.processes import PROJECT_ROOT
from tests.e2e.workload import REFERENCE_REQUESTS, extra_body, request_body

CACHE_DIR = PROJECT_ROOT / ".cache"
# Ray 2.60 starts new clusters with token auth; every process of the test session (the head, `serve run`, the
# drivers) uses one token rather than turning authentication off. Set before Ray is first imported.
processes.use_ray_token_auth()
# httpx logs every request at INFO: thousands of lines in a failed test's captured output would hide its error.
logging.getLogger("httpx").setLevel(logging.WARNING)


def _app_config() -> tuple[dict[str, Any], Any]:
    """The suite's app: serve_config.yaml with TEST_OVERRIDES, as a `serve run` config and as the app validates it."""
    from bench.systems import app_config, serve_config

    config = serve_config(**TEST_OVERRIDES)
    return config, app_config(config)


@pytest.fixture(scope="session")
def logs_dir() -> Path:
    path = PROJECT_ROOT / ".cache" / "test-logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run_reference(requests: dict[str, tuple[str, dict]], logs_dir: Path) -> dict[str, dict]:
    """One standalone vLLM OpenAI server with the app's model and engine settings, no KV connector."""
    import openai

    _, config = _app_config()
    with processes.vllm_api_server(config, log_path=logs_dir / "reference-engine.log") as base_url:
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
        return {name: send(client, *request_body(name)) for name in requests}


def loaded_prompt_counts(resolved_backend: str, num_prompt_tokens: int) -> set[tuple[int, int]]:
    """The (prompt tokens computed, prompt tokens external) decode's engine counters may show for a split whose KV
    loaded. Decode computes the prompt's last token either way, to sample from it, and nothing else of the prompt.
    Inside the step that computes it (`transfer.is_load_in_step`) vLLM counts that token as computed; a load in the
    background makes vLLM count it as loaded. By default the object store loads every split that carries its
    receipt in step; NIXL every split from a prefill engine decode already holds a connection to, and the first from
    each engine in the background (kv_transfer/nixl/in_step.py)."""
    in_step = (1, num_prompt_tokens - 1)
    return {in_step} if resolved_backend == "object_store" else {in_step, (0, num_prompt_tokens)}


def send(client: Any, endpoint: str, body: dict[str, Any], stream: bool = False,
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request through the official client (`extra`: more of vLLM's own request fields); returns text,
    generated token ids and usage."""
    request_extra = {**extra_body(), **(extra or {})}
    call = client.chat.completions.create if endpoint == "chat" else client.completions.create
    if not stream:
        response = call(**body, extra_body=request_extra)
        choice = response.choices[0]
        text = choice.message.content if endpoint == "chat" else choice.text
        return {"text": text, "token_ids": list(choice.token_ids), "finish_reason": choice.finish_reason,
                "usage": response.usage.model_dump()}
    text, token_ids, finish_reason, usage = "", [], None, None
    for chunk in call(**body, stream=True, stream_options={"include_usage": True}, extra_body=request_extra):
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            text += (choice.delta.content or "") if endpoint == "chat" else choice.text
            token_ids += list(getattr(choice, "token_ids", None) or [])
            finish_reason = choice.finish_reason or finish_reason
    return {"text": text, "token_ids": token_ids, "finish_reason": finish_reason, "usage": usage}


@pytest.fixture(scope="session")
def reference_outputs(logs_dir: Path) -> dict[str, dict]:
    """Greedy outputs of a single standalone vLLM engine, cached by model, settings, vLLM version and requests."""
    import vllm

    from deployments.engine import vllm_cli_args

    _, config = _app_config()
    marker = Path(config.model.path) / "splitserve-conversion.json"
    key_source = json.dumps({
        "vllm": vllm.__version__,
        "args": vllm_cli_args(config.model, config.prefill, None),
        "model": marker.read_text() if marker.exists() else config.model.path,
        "requests": [request_body(name) for name in REFERENCE_REQUESTS],
        "extra": extra_body(),
    }, sort_keys=True)
    cache = CACHE_DIR / f"reference-{hashlib.sha256(key_source.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    outputs = _run_reference(REFERENCE_REQUESTS, logs_dir)
    cache.write_text(json.dumps(outputs, indent=1))
    return outputs


# Both runs use serve_config.yaml's default, `auto`: as installed it must resolve to nixl on this machine kind
# (NIXL installed, UCX over DRAM works); with NIXL made unavailable to every process of the cluster it must
# fall back to the object store, and the app must still pass every test.
TRANSFER_BACKENDS = ["auto", "auto-without-nixl"]
# Package-scoped app fixtures, each shared by the modules of one folder (tests/e2e/npmd/conftest.py).
FOLDER_APP_FIXTURES = ("npmd",)
RESOLVED_BACKENDS = {"auto": "nixl", "auto-without-nixl": "object_store"}
# The second run also requires an API key (router.api_key_env), so that every test there goes through the auth path.
API_KEYS = {"auto": None, "auto-without-nixl": "splitserve-test-key"}
# Where the suite's app differs from serve_config.yaml, beyond the HTTP port: a small overload bound, so that the
# overload test reaches it in seconds, and a short KV load timeout, so that the timeout fault test is quick. Its
# requests all take the split path (`always_split`), the one that moves KV, which every transfer, fault and leak
# test here is about: the default policy (`predictive`) would run most of these one-at-a-time prompts on an idle
# decode engine. The default policy and each of its paths are tested on an app of their own
# (tests/e2e/npmd/test_scheduling_paths.py).
# A KV handle key the suite knows (else each deploy makes its own), so that fault tests can sign the handles they
# forge on purpose, as a prefill replica would.
TEST_KV_HANDLE_KEY = "splitserve-test-kv-handle-key-0123456789abcdef"
TEST_OVERRIDES = {"prefill": {"max_queued_requests": 4}, "decode": {"max_queued_requests": 4},
                  "transfer": {"load_timeout_s": 10}, "scheduling": {"policy": "always_split"}}


@dataclass(frozen=True)
class RunningApp:
    backend: str
    base_url: str
    ray_address: str
    log_path: Path
    metrics_url: str
    session_dir: Path
    model_path: str
    # KV loads that tests failed on purpose (fault injection): the leak check expects exactly these.
    injected: dict[str, int]
    api_key: str | None = None
    kv_handle_key: str = TEST_KV_HANDLE_KEY

    @property
    def resolved_backend(self) -> str:
        return RESOLVED_BACKENDS[self.backend]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _without_nixl(workdir: Path) -> dict[str, str]:
    """An environment in which `import nixl` fails, for every process started with it (Ray workers included)."""
    broken = workdir / "nixl"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('NIXL made unavailable by the test suite')\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(broken.parent), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="session", params=TRANSFER_BACKENDS)
def app(request, reference_outputs: dict, logs_dir: Path, tmp_path_factory) -> RunningApp:
    """`serve run` on a copy of serve_config.yaml that differs only by TEST_OVERRIDES and its HTTP port, on a Ray
    head of our own; once as installed and once with NIXL made unavailable. Every end-to-end test runs in both."""
    backend = request.param
    serve_config, config = _app_config()
    args = serve_config["applications"][0]["args"]
    args["transfer"]["backend"] = "auto"
    environment = _without_nixl(tmp_path_factory.mktemp("no-nixl")) if backend == "auto-without-nixl" else {}
    if API_KEYS[backend]:
        environment[config.router.api_key_env] = API_KEYS[backend]
    environment[config.transfer.handle_key_env] = TEST_KV_HANDLE_KEY
    with processes.serve_run(serve_config, name=backend, logs_dir=logs_dir, env=environment) as served:
        yield RunningApp(backend=backend, base_url=served.base_url, ray_address=served.ray_address,
                         log_path=served.log_path, metrics_url=served.metrics_url, session_dir=served.session_dir,
                         model_path=config.model.path,
                         injected={"num_failed_loads": 0, "num_expired": 0, "num_released_unclaimed": 0},
                         api_key=API_KEYS[backend])


@pytest.fixture(scope="session")
def openai_client(app: RunningApp) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key=app.api_key or "unused", max_retries=0, timeout=300)


def connect_driver(address: str) -> None:
    """This test process as a Ray driver of the app's cluster. A Ray still initialized in this process (a local
    instance started by calling Ray's API without `ray.init`: seen once in a full CI run, during the nPmD module;
    the likely cause, a Serve handle's metrics thread outliving `ray.shutdown()`, is what
    `engines.disconnect_driver` now prevents) is shut down first, with the local cluster it started, instead of
    failing every test after it with "ray.init twice"."""
    import ray

    if ray.is_initialized():
        warnings.warn("a Ray instance was still initialized in the test process; shutting it down", stacklevel=2)
        ray.shutdown()
    ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)


@pytest.fixture(scope="session")
def ray_driver(app: RunningApp):
    """This test process as a Ray driver, to read engine counters through deployment handles."""
    import ray

    from bench import engines

    connect_driver(app.ray_address)
    yield ray
    engines.disconnect_driver()


def pytest_itemcollected(item) -> None:
    """Everything under tests/e2e is `e2e`, marked as it is collected, so that `-m "not e2e"` deselects it."""
    if "tests/e2e" in str(item.fspath):
        item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(trylast=True)  # after pytest grouped the items by the app fixture's parameter
def pytest_collection_modifyitems(items: list) -> None:
    """Unit tests first (a broken piece fails fast); then the end-to-end modules with apps of their own, in pytest's
    order (grouped by their own fixtures' parameters, each module's leak check last in its file); then, per
    transfer backend of the shared app, every end-to-end test with the leak check last, since it walks the end of
    the whole life cycle. Moving a module's own leak check out of its group would start its app again.
    A folder's app (tests/e2e/npmd: one app for several modules) keeps its place; within it, per parameter, its
    tests come first, then the leak checks, then the tests marked `ends_app`, after which the app cannot serve."""
    def order(item) -> tuple:
        is_e2e = "tests/e2e" in str(item.fspath)
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("app", "") if callspec else ""
        if backend not in TRANSFER_BACKENDS:
            return is_e2e, -1, False
        return is_e2e, TRANSFER_BACKENDS.index(backend), item.name.startswith("test_nothing_leaked")

    items.sort(key=order)
    for name in FOLDER_APP_FIXTURES:
        positions = [index for index, item in enumerate(items)
                     if name in getattr(getattr(item, "callspec", None), "params", {})]
        params = list(dict.fromkeys(items[index].callspec.params[name] for index in positions))

        def within(item, name=name, params=params) -> tuple:
            is_leak_check = item.name.startswith("test_nothing_leaked")
            stage = 2 if item.get_closest_marker("ends_app") else 1 if is_leak_check else 0
            return params.index(item.callspec.params[name]), stage

        for index, item in zip(positions, sorted((items[index] for index in positions), key=within)):
            items[index] = item


_session_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _session_exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Leave with pytest's own exit status once every result is reported, without the interpreter's final clean-up.

    This process was a Ray driver several times over (unit tests' local clusters, then each app's cluster), and Ray's
    core-worker threads can outlive `ray.shutdown()` (ray-project/ray#31145): once in a CI-like run, after
    "237 passed", the clean-up crashed with a segmentation fault and `make test` failed. Nothing is left to run
    here: every fixture has stopped what it started, and the summary is out."""
    if not _session_exit_status:
        return
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    os._exit(_session_exit_status[-1])
