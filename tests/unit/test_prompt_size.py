"""The router's prompt size, with the embedded model's own tokenizer and chat template: what the scheduler decides
on before any engine sees the request."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from deployments.prompt_size import PromptSizer
from serve_app.config import DEFAULT_MODEL_DIR

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def sizer() -> PromptSizer:
    return PromptSizer(str(DEFAULT_MODEL_DIR))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL_DIR))


def test_a_completion_counts_its_encoded_text_or_its_token_ids(sizer, tokenizer):
    text = "The capital of France is"
    assert sizer.num_tokens(CompletionRequest(model=MODEL, prompt=text)) == len(tokenizer.encode(text))
    assert sizer.num_tokens(CompletionRequest(model=MODEL, prompt=[5, 6, 7, 8])) == 4
    assert sizer.num_tokens(CompletionRequest(model=MODEL, prompt=[text])) == len(tokenizer.encode(text))


def test_a_chat_counts_the_rendered_template_with_the_generation_prompt(sizer, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = len(tokenizer.encode(rendered, add_special_tokens=False))
    request = ChatCompletionRequest(model=MODEL, messages=messages)
    assert sizer.num_tokens(request) == expected
    # The template's words are counted: more than the two messages' text alone.
    assert expected > len(tokenizer.encode("Be brief. Name three rivers."))
    without_prompt = ChatCompletionRequest(model=MODEL, messages=messages, add_generation_prompt=False)
    assert sizer.num_tokens(without_prompt) < expected


def test_a_message_the_template_cannot_render_still_gets_a_size(sizer, monkeypatch):
    request = ChatCompletionRequest(model=MODEL, messages=[{"role": "user", "content": "one two three"}])

    def broken(*args, **kwargs):
        raise ValueError("template error")

    monkeypatch.setattr(sizer._tokenizer, "apply_chat_template", broken)
    assert sizer.num_tokens(request) >= 3
