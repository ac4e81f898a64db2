"""bench.gemm_rows times the served model's own linear layers: their shapes come from its config."""

from __future__ import annotations

from bench.gemm_rows import layer_shapes
from bench.systems import app_config


def test_the_layers_are_the_served_models_own():
    from transformers import AutoConfig

    path = app_config().model.path
    config = AutoConfig.from_pretrained(path)
    shapes = layer_shapes(path)
    assert len(shapes) == 4 * config.num_hidden_layers + 1 and shapes[-1] == ("lm_head", config.vocab_size,
                                                                               config.hidden_size)
    # SmolLM2-135M: 9 query heads and 3 KV heads of 64, a 1,536-wide MLP: 0.54 GB of weights in float32.
    assert shapes[:4] == [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
    assert sum(out_features * in_features for _, out_features, in_features in shapes) * 4 / 1e9 > 0.5
