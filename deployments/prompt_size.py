"""How many tokens a request's prompt is, known in the router before any engine sees it: the scheduler's input.

1. A completion's prompt is encoded with the model's tokenizer (token ids are counted as they are).
2. A chat request's messages go through the model's own chat template (the tokenizer's `apply_chat_template`, as
   vLLM does), with the request's `add_generation_prompt`, `continue_final_message` and `chat_template_kwargs`.
3. What the template cannot render (an unusual message shape, tools the template does not know) falls back to the
   encoded text of the messages: a decision needs a size, not an exact one. The engine's `usage.prompt_tokens` is
   the exact count, and what the learned rates are fitted to.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from deployments.messages import OpenAIRequest

logger = logging.getLogger("ray.serve")


class PromptSizer:
    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(model_path)

    def num_tokens(self, request: OpenAIRequest) -> int:
        if isinstance(request, CompletionRequest):
            return self._completion(request.prompt)
        if isinstance(request, ChatCompletionRequest):
            return self._chat(request)
        raise TypeError(f"not an OpenAI request: {type(request).__name__}")

    def _completion(self, prompt: Any) -> int:
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return len(prompt)  # token ids
        if isinstance(prompt, list):  # one prompt in a list (several are refused before scheduling)
            return sum(self._completion(each) for each in prompt)
        return len(self._tokenizer.encode(prompt or "", add_special_tokens=True))

    def _chat(self, request: ChatCompletionRequest) -> int:
        messages = [message if isinstance(message, dict) else message.model_dump(exclude_none=True)
                    for message in request.messages]
        try:
            return len(self._tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=False, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                **(request.chat_template_kwargs or {})))
        except Exception as exc:  # a size for the decision, never a failed request
            logger.debug("chat template failed for %s (%s): counting the messages' text", request.request_id, exc)
            text = " ".join(str(message.get("content") or "") for message in messages)
            return len(self._tokenizer.encode(text, add_special_tokens=True))
