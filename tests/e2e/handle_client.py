"""A separate Ray driver calling the running app through its deployment handle, as another Ray app would.

Usage: python -m tests.e2e.handle_client RAY_ADDRESS  -> prints one JSON object with the results.
"""

from __future__ import annotations

import json
import sys

import ray
from ray import serve
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from bench import engines
from tests.e2e.workload import request_body


def main(address: str) -> None:
    ray.init(address=address, namespace="serve", logging_level="ERROR", log_to_driver=False)
    router = serve.get_app_handle("splitserve")
    _, chat_body = request_body("chat_multi_turn")
    _, completion_body = request_body("completion_short")
    chat = ChatCompletionRequest(**chat_body, return_token_ids=True)
    completion = CompletionRequest(**completion_body, return_token_ids=True)

    chat_response = router.chat.remote(chat).result()
    completion_response = router.completion.remote(completion).result()
    chat_chunks = list(router.options(stream=True).chat_stream.remote(chat))
    completion_chunks = list(router.options(stream=True).completion_stream.remote(completion))
    bad = router.chat.remote(chat.model_copy(update={"model": "no-such-model"})).result()

    print(json.dumps({
        "chat": {"text": chat_response.choices[0].message.content,
                 "token_ids": list(chat_response.choices[0].token_ids)},
        "completion": {"text": completion_response.choices[0].text,
                       "token_ids": list(completion_response.choices[0].token_ids)},
        "chat_stream": {
            "types": sorted({type(chunk).__name__ for chunk in chat_chunks}),
            "text": "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices),
            "token_ids": [t for c in chat_chunks if c.choices for t in (c.choices[0].token_ids or [])],
        },
        "completion_stream": {
            "types": sorted({type(chunk).__name__ for chunk in completion_chunks}),
            "text": "".join(c.choices[0].text for c in completion_chunks if c.choices),
            "token_ids": [t for c in completion_chunks if c.choices for t in (c.choices[0].token_ids or [])],
        },
        "unknown_model": {"type": type(bad).__name__, "code": bad.error.code},
    }))
    engines.disconnect_driver()


if __name__ == "__main__":
    main(sys.argv[1])
