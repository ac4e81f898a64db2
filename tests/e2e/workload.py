"""The requests the end-to-end tests send, identical for the standalone reference engine and for splitserve.

Greedy (temperature 0) with `return_token_ids`, a vLLM extension, so outputs compare token for token.
"""

from __future__ import annotations

from typing import Any

from bench.load_generator import filler_document as long_document

MODEL = "SmolLM2-135M-Instruct"


CHAT_MULTI_TURN = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Name another one."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And the third one? Answer in one sentence."},
]

# name -> (endpoint, body without model/temperature)
EXACTNESS_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat_capital": ("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                              "max_tokens": 24}),
    "chat_multi_turn": ("chat", {"messages": CHAT_MULTI_TURN, "max_tokens": 24}),
    "chat_poem_stop": ("chat", {"messages": [{"role": "user", "content": "Write a short poem about the sea."}],
                                "max_tokens": 32, "stop": ["\n\n"]}),
    "completion_short": ("completion", {"prompt": "The three largest planets of the solar system are",
                                        "max_tokens": 24}),
    "completion_long": ("completion", {"prompt": long_document(), "max_tokens": 24}),
}


# Requests of the fault tests: prompts no other test sends, since a recomputed prompt lands in decode's own prefix
# cache, and a later test of the same prompt would then find it there instead of loading it.
FAULT_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "completion_long_faults": ("completion", {"prompt": long_document(first_year=1800), "max_tokens": 24}),
    "completion_short_faults": ("completion", {"prompt": "The four seasons of the year, in order, are",
                                               "max_tokens": 16}),
    "completion_prefill_killed": ("completion", {"prompt": long_document(first_year=1700), "max_tokens": 16}),
    "completion_kv_timeout": ("completion", {"prompt": "The colours of the rainbow, in order, are", "max_tokens": 16}),
    "completion_forged_handle": ("completion", {"prompt": "The five oceans of the world are", "max_tokens": 16}),
}
# Requests of the scheduling tests (npmd/test_scheduling_paths.py): each path must answer them exactly like the
# reference, greedy and with a fixed sampling seed.
SCHEDULING_REQUESTS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat_paths": ("chat", {"messages": [{"role": "user", "content": "Name three rivers of Europe."}],
                            "max_tokens": 24}),
    "completion_long_paths": ("completion", {"prompt": long_document(first_year=1500), "max_tokens": 24}),
    "completion_seeded_paths": ("completion", {"prompt": "A short story about a lighthouse keeper:",
                                               "max_tokens": 24, "temperature": 0.9, "seed": 1234}),
}
REFERENCE_REQUESTS = {**EXACTNESS_REQUESTS, **FAULT_REQUESTS, **SCHEDULING_REQUESTS}


def request_body(name: str) -> tuple[str, dict[str, Any]]:
    endpoint, body = REFERENCE_REQUESTS[name]
    return endpoint, {"model": MODEL, "temperature": 0.0, **body}


def extra_body() -> dict[str, Any]:
    return {"return_token_ids": True}
