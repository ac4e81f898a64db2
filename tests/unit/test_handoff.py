"""The hand-off (deployments/handoff.py), step by step, with fake deployment handles: prefill → KV handle → decode,
the scheduler's other paths (decode-local, prefill-local), and every way a request can leave it. Each story ends
with admission holding nothing, every dispatch closed, and no KV left unreleased.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from ray.exceptions import RayActorError
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from deployments.admission import Admission
from deployments.error_responses import bad_request, server_error
from deployments.handoff import CollocatedHandoff, PDHandoff
from deployments.messages import LoadReport
from deployments.phase_timing import PhaseTiming
from deployments.scheduler import Scheduler
from deployments.scheduling.policies import Path
from serve_app.config import SchedulingConfig
from kv_transfer.handle import KVHandle

CHUNKS = ['data: {"choices":[{"text":"a"}]}\n\n', 'data: {"choices":[{"text":"b"}]}\n\n', "data: [DONE]\n\n"]
HANDLE = KVHandle(backend="nixl", request_id="r1", num_prompt_tokens=3, prefill_engine_id="prefill-0-x",
                  connector_params={"remote_engine_id": "e", "remote_request_id": "r1", "remote_host": "h",
                                    "remote_port": 1, "remote_block_ids": [[0]]})


class Answer:
    """What `handle.method.remote(...)` returns when not streamed: awaitable, raising a failure if given one."""

    def __init__(self, value: Any):
        self._value = value

    def __await__(self):
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value
        yield  # a generator, as __await__ must be


class Stream:
    """What `handle.options(stream=True).method.remote(...)` returns: an async iterator that can be cancelled."""

    def __init__(self, items: list[Any]):
        self._items = list(items)
        self.is_cancelled = False

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Any:
        if not self._items:
            raise StopAsyncIteration
        item = self._items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.is_cancelled = True


class FakeEngine:
    """Decode (`decode(request, handle)`), a collocated engine or a prefill-local one (`generate(request)`), always
    called as a stream; `dispatches` keeps the scheduler's `Dispatch` of each call."""

    def __init__(self, items: list[Any] = CHUNKS):
        self._items = items
        self.calls: list[tuple] = []
        self.dispatches: list[Any] = []
        self.streams: list[Stream] = []

    def options(self, stream: bool) -> FakeEngine:
        assert stream, "the hand-off always reads an engine as a stream"
        return self

    def _call(self, *args: Any, dispatch: Any = None) -> Stream:
        self.calls.append(args)
        self.dispatches.append(dispatch)
        self.streams.append(Stream(self._items))
        return self.streams[-1]

    @property
    def decode(self):
        return type("Method", (), {"remote": staticmethod(self._call)})

    @property
    def generate(self):
        return type("Method", (), {"remote": staticmethod(self._call)})


class FakePrefill(FakeEngine):
    def __init__(self, answer: Any = HANDLE):
        super().__init__()
        self._answer = answer
        self.requests: list[Any] = []
        self.released: list[tuple[KVHandle, Any]] = []

    @property
    def prefill(self):
        def remote(request, dispatch=None):
            self.requests.append(request)
            self.dispatches.append(dispatch)
            return Answer(self._answer)
        return type("Method", (), {"remote": staticmethod(remote)})

    @property
    def release(self):
        return type("Method", (), {"remote": staticmethod(
            lambda handle, dispatch=None: self.released.append((handle, dispatch)))})


def _stats(*reports: LoadReport) -> dict[str, dict]:
    """What Serve's request router publishes: each replica's routing stats by its Serve replica id."""
    return {f"replica-of-{report.engine_id}": report.to_routing_stats() for report in reports}


ENGINE_STATS = {"PrefillServer": _stats(LoadReport(engine_id="prefill-0-x", role="prefill"),
                                        LoadReport(engine_id="prefill-1-y", role="prefill",
                                                   num_pending_prompt_tokens=900, num_requests=1)),
                "DecodeServer": _stats(LoadReport(engine_id="decode-0-z", role="decode"))}


def _scheduler(policy: str = "token_jsq", stats: dict | None = None) -> Scheduler:
    stats = ENGINE_STATS if stats is None else stats
    return Scheduler(SchedulingConfig(policy=policy), router_id="router-0", prefill_deployment="PrefillServer",
                     decode_deployment="DecodeServer", prompt_size=lambda request: 3,
                     routing_stats=lambda deployment: (1, stats.get(deployment, {})))


def _request(**update: Any) -> CompletionRequest:
    return CompletionRequest(**{"model": "m", "prompt": "hi", "max_tokens": 4, "stream": True, "request_id": "r1",
                                **update})


def _pd(prefill: FakePrefill, decode: FakeEngine, num_admissible: int = 4,
        scheduler: Scheduler | None = None) -> tuple[PDHandoff, list[int]]:
    fallbacks: list[int] = []
    handoff = PDHandoff(Admission(num_admissible, num_admissible), prefill=prefill, decode=decode,
                        scheduler=scheduler or _scheduler("always_split", stats={}),
                        on_prefill_fallback=lambda: fallbacks.append(1))
    return handoff, fallbacks


def _serve(handoff, request: CompletionRequest, timing: PhaseTiming | None = None, path: Path | None = None) -> Any:
    return asyncio.run(_serve_and_read(handoff, request, timing or PhaseTiming(), path))


async def _serve_and_read(handoff, request, timing, path=None) -> Any:
    result = await handoff.serve(request, timing, path)
    if hasattr(result, "__aiter__"):
        return [chunk async for chunk in result]
    return result


def _assert_nothing_held(handoff) -> None:
    assert set(handoff.admission.counts().values()) == {0}, handoff.admission.counts()
    scheduler = getattr(handoff, "_scheduler", None)
    if scheduler is not None:  # every dispatch closed: the book counts nothing of this router's
        for role in ("prefill", "decode"):
            for engine_id in scheduler.book.engine_ids(role):
                assert not scheduler.book.engine(engine_id).live, engine_id


def test_a_stream_goes_prefill_then_decode_with_the_kv_handle():
    prefill, decode = FakePrefill(), FakeEngine()
    handoff, fallbacks = _pd(prefill, decode)
    timing = PhaseTiming()

    # 1. Prefill gets the user's request; decode gets the same request and prefill's handle.
    chunks = _serve(handoff, _request(), timing)
    assert [request.request_id for request in prefill.requests] == ["r1"]
    assert decode.calls == [(prefill.requests[0], HANDLE)]
    assert timing.path == "split" and 'path;desc="split"' in timing.header()
    # 2. Decode's chunks pass through untouched; the phases are timed.
    assert chunks == CHUNKS
    assert timing.prefill_engine_id == "prefill-0-x" and timing.prefill_s is not None
    assert timing.first_chunk_s is not None
    # 3. Over: decode's request is let go, admission holds nothing, no fallback, no KV released (decode read it).
    assert decode.streams[0].is_cancelled
    assert not fallbacks and not prefill.released
    _assert_nothing_held(handoff)


def test_a_plain_response_comes_back_as_the_object_decode_returned():
    response = CompletionResponse(model="m", choices=[], usage={"prompt_tokens": 1, "total_tokens": 2,
                                                                "completion_tokens": 1})
    handoff, _ = _pd(FakePrefill(), FakeEngine([response]))
    assert _serve(handoff, _request(stream=False)) is response
    _assert_nothing_held(handoff)


def test_a_client_error_from_prefill_is_the_answer_and_decode_is_never_asked():
    refusal = bad_request("This model's maximum context length is 2048 tokens")
    decode = FakeEngine()
    handoff, fallbacks = _pd(FakePrefill(refusal), decode)
    assert _serve(handoff, _request()) is refusal
    assert not decode.calls and not fallbacks
    _assert_nothing_held(handoff)


@pytest.mark.parametrize("failure", [server_error("engine broke"), RayActorError()], ids=["5xx", "replica-died"])
def test_a_failed_prefill_makes_decode_compute_the_prompt(failure):
    decode = FakeEngine()
    handoff, fallbacks = _pd(FakePrefill(failure), decode)
    assert _serve(handoff, _request()) == CHUNKS
    assert decode.calls[0][1] is None  # no handle: decode computes the prompt itself
    assert fallbacks == [1]
    _assert_nothing_held(handoff)


def test_decode_failing_before_its_first_token_is_a_503_and_the_kv_is_released():
    prefill = FakePrefill()
    handoff, _ = _pd(prefill, FakeEngine([RayActorError()]))
    answer = _serve(handoff, _request())
    assert isinstance(answer, ErrorResponse) and answer.error.code == 503
    assert [handle for handle, _ in prefill.released] == [HANDLE]  # not left to its lease
    _assert_nothing_held(handoff)


def test_a_full_role_is_refused_before_any_engine_is_asked():
    prefill, decode = FakePrefill(), FakeEngine()
    handoff, _ = _pd(prefill, decode, num_admissible=1)
    assert handoff.admission.try_admit() is None  # one request already in
    answer = _serve(handoff, _request())
    assert isinstance(answer, ErrorResponse) and answer.error.code == 503 and "capacity" in answer.error.message
    assert not prefill.requests and not decode.calls
    handoff.admission.prefill_done()
    handoff.admission.finished()
    _assert_nothing_held(handoff)


def test_what_a_split_cannot_honour_is_refused_and_nothing_is_admitted():
    prefill = FakePrefill()
    handoff, _ = _pd(prefill, FakeEngine())
    answer = _serve(handoff, _request(n=2))
    assert isinstance(answer, ErrorResponse) and answer.error.code == 400 and answer.error.param == "n"
    assert not prefill.requests
    _assert_nothing_held(handoff)


def test_a_client_that_leaves_before_the_body_starts_frees_its_slot_and_decode():
    decode = FakeEngine()
    handoff, _ = _pd(FakePrefill(), decode)

    async def leave() -> None:
        stream = await handoff.serve(_request(), PhaseTiming())
        assert handoff.admission.counts()["num_in_flight"] == 1
        del stream  # Starlette drops a body it never started when the client is gone
        gc.collect()

    asyncio.run(leave())
    assert decode.streams[0].is_cancelled
    _assert_nothing_held(handoff)


def test_token_jsq_sends_each_call_to_the_chosen_replicas_and_the_release_to_the_owner():
    prefill, decode = FakePrefill(), FakeEngine([RayActorError()])
    handoff, _ = _pd(prefill, decode, scheduler=_scheduler("token_jsq"))
    # 1. The scheduler picks the prefill replica with the shorter queue and the only decode replica; each call's
    #    Dispatch names them (Serve's request router reads it) with the prompt tokens it will compute.
    answer = _serve(handoff, _request())
    (prefill_dispatch,), (decode_dispatch,) = prefill.dispatches, decode.dispatches
    assert (prefill_dispatch.replica_id, prefill_dispatch.num_prompt_tokens) == ("replica-of-prefill-0-x", 3)
    assert (decode_dispatch.replica_id, decode_dispatch.num_prompt_tokens) == ("replica-of-decode-0-z", 0)
    assert prefill_dispatch.seq < decode_dispatch.seq and prefill_dispatch.router_id == "router-0"
    # 2. Decode failed before its first token: the release goes to the replica that owns the handle's KV.
    assert isinstance(answer, ErrorResponse) and answer.error.code == 503
    ((handle, release),) = prefill.released
    assert handle == HANDLE and release.replica_id == "replica-of-prefill-0-x"
    _assert_nothing_held(handoff)


@pytest.mark.parametrize(("path", "engine"), [(Path.DECODE_LOCAL, "decode"), (Path.PREFILL_LOCAL, "prefill")])
def test_a_local_path_runs_the_whole_request_on_one_engine(path, engine):
    prefill, decode = FakePrefill(), FakeEngine()
    handoff, _ = _pd(prefill, decode, scheduler=_scheduler("token_jsq"))
    timing = PhaseTiming()
    assert _serve(handoff, _request(), timing, path=path) == CHUNKS
    assert not prefill.requests and not prefill.released  # no prefill stage, no KV
    ran, idle = (decode, prefill) if engine == "decode" else (prefill, decode)
    assert len(ran.calls) == 1 and not idle.calls
    if engine == "decode":
        assert ran.calls[0][1] is None  # no KV handle: decode computes the prompt
    assert ran.dispatches[0].num_prompt_tokens == 3 and ran.dispatches[0].replica_id.startswith(f"replica-of-{engine}")
    assert ran.streams[0].is_cancelled and timing.path == path.value and timing.prefill_s is None
    assert handoff._scheduler.decisions == {path.value: 1}
    _assert_nothing_held(handoff)


@pytest.mark.parametrize("path", [Path.SPLIT, Path.DECODE_LOCAL, Path.PREFILL_LOCAL])
def test_a_streams_engine_work_is_counted_over_before_the_client_reads_done(path):
    """A client that sends its next request on [DONE] (one user at a time) must find the last one gone from the
    book: anchor-c1 in the probe at 6f4b016 saw decode still busy with it and never ran a prompt there."""
    handoff, _ = _pd(FakePrefill(), FakeEngine(), scheduler=_scheduler("token_jsq"))

    async def read_to_done() -> list[int]:
        held_at_done = []
        async for chunk in await handoff.serve(_request(), PhaseTiming(), path):
            if chunk == "data: [DONE]\n\n":
                book = handoff._scheduler.book
                held_at_done = [len(book.engine(engine_id).live) for role in ("prefill", "decode")
                                for engine_id in book.engine_ids(role)]
        return held_at_done

    assert set(asyncio.run(read_to_done())) == {0}
    _assert_nothing_held(handoff)


def test_collocated_runs_the_request_on_one_engine_as_it_is():
    engine = FakeEngine()
    handoff = CollocatedHandoff(Admission(None, 4), collocated=engine)
    request = _request(n=2)  # a plain engine may honour what a split cannot
    assert _serve(handoff, request) == CHUNKS
    assert engine.calls == [(request,)]
    _assert_nothing_held(handoff)


def test_a_whole_answer_teaches_the_policy_how_long_answers_are():
    scheduler = _scheduler("predictive")
    handoff, _ = _pd(FakePrefill(), FakeEngine(), scheduler=scheduler)
    before = scheduler.policy.expected_output_tokens
    assert _serve(handoff, _request()) == CHUNKS  # two token chunks, then [DONE]
    assert scheduler.policy.expected_output_tokens == pytest.approx(before + (2 - before) / 32)
    _assert_nothing_held(handoff)
