"""serve_config.yaml is validated once at start-up; each error names the bad value."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from serve_app.config import PROJECT_ROOT, AppConfig, EngineRoleConfig


def _args() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def test_shipped_serve_config_is_valid_and_resolves_the_model_path():
    config = AppConfig.model_validate(_args())
    assert config.model.path == str(PROJECT_ROOT / ".models" / "SmolLM2-135M-Instruct")
    assert config.prefill.cpu_binding_for(0) == "0"
    assert config.decode.cpu_binding_for(0) == "1"
    assert config.transfer.backend == "auto"


def test_config_is_frozen():
    config = AppConfig.model_validate(_args())
    with pytest.raises(ValidationError):
        config.model.dtype = "bfloat16"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("model", "dtype", "fp8", "fp8"),
        ("model", "path", "/no/such/model-dir", "/no/such/model-dir"),
        ("model", "max_model_len", 0, "max_model_len"),
        ("prefill", "cpu_binding", ["zero"], "zero"),
        ("decode", "num_replicas", 0, "num_replicas"),
        ("transfer", "backend", "carrier-pigeon", "carrier-pigeon"),
        ("router", "unknown_knob", 1, "unknown_knob"),
    ],
)
def test_bad_values_are_named_in_the_error(section, key, value, message):
    args = _args()
    args[section][key] = value
    with pytest.raises(ValidationError) as error:
        AppConfig.model_validate(args)
    assert message in str(error.value)


def test_one_binding_per_replica_or_one_shared():
    assert EngineRoleConfig(num_replicas=2, cpu_binding="0").cpu_binding_for(1) == "0"
    assert EngineRoleConfig(num_replicas=2, cpu_binding=["0", "1"]).cpu_binding_for(1) == "1"
    with pytest.raises(ValidationError, match="3 entries for 2 replicas"):
        EngineRoleConfig(num_replicas=2, cpu_binding=["0", "1", "2"])


def test_a_directory_without_config_json_is_not_a_model(tmp_path):
    args = _args()
    args["model"]["path"] = str(tmp_path)
    with pytest.raises(ValidationError, match="no config.json"):
        AppConfig.model_validate(args)


def test_an_engine_replica_takes_its_batch_and_the_role_queue_while_the_overload_bound_stays():
    """Requests past an engine's batch wait in vLLM's scheduler (Serve's max_ongoing_requests covers them), not in
    Serve's router retrying the chosen replica; the router's overload bound counts the same requests as before."""
    role = EngineRoleConfig(num_replicas=2, max_num_seqs=16, max_queued_requests=32)
    assert role.num_ongoing_per_replica == 16 + 32
    assert role.num_admissible == 2 * 16 + 32
    chosen = EngineRoleConfig(num_replicas=2, max_num_seqs=16, max_queued_requests=32, max_ongoing_requests=20)
    assert chosen.num_ongoing_per_replica == 20 and chosen.num_admissible == 2 * 20 + 32
