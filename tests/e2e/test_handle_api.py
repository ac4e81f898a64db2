"""Another Ray driver calls the running app through `serve.get_app_handle` and gets what HTTP clients get."""

from __future__ import annotations

import json
import subprocess

from bench.processes import PROJECT_ROOT, VENV_BIN


def test_handle_api_from_a_separate_driver_matches_http(app, reference_outputs):
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "tests.e2e.handle_client", app.ray_address],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    outputs = json.loads(result.stdout.strip().splitlines()[-1])

    for kind, reference_name in (("chat", "chat_multi_turn"), ("completion", "completion_short")):
        reference = reference_outputs[reference_name]
        assert outputs[kind]["token_ids"] == reference["token_ids"]
        assert outputs[kind]["text"] == reference["text"]
        assert outputs[f"{kind}_stream"]["token_ids"] == reference["token_ids"]
        assert outputs[f"{kind}_stream"]["text"] == reference["text"]
    assert outputs["chat_stream"]["types"] == ["ChatCompletionStreamResponse"]
    assert outputs["completion_stream"]["types"] == ["CompletionStreamResponse"]
    assert outputs["unknown_model"] == {"type": "ErrorResponse", "code": 404}
