"""A vLLM-loadable copy of a model folder that `sparkkv.models` saved.

`sparkkv.models.load("smollm2-135m")` saves SmolLM2-135M-Instruct as a transformers folder whose
`config.json` has `"architectures": null` and whose checkpoint holds the tied word embedding under
`lm_head.weight` only. transformers loads that; vLLM 0.32 does not: it resolves the architecture to
`LlamaModel` (no LM head) and, with tied embeddings, never finds `model.embed_tokens.weight`, so every
step yields token 0. `vllm_model_dir` writes a sibling folder `<name>-vllm` with the architecture named
and the embedding stored under the name vLLM reads (same float32 tensors, nothing else changed).

    path = sparkkv.vllm.models.vllm_model_dir("smollm2-135m")   # -> ~/.cache/sparkkv/smollm2-135m-vllm
    LLM(model=str(path), ...)
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def vllm_model_dir(name_or_path: str = "smollm2-135m") -> Path:
    """Folder vLLM can serve for `name_or_path` (a `sparkkv.models` registry name or a saved folder).

    A registry name is fetched with `sparkkv.models.load` when its folder is missing (that needs the
    packages `sparkkv.models` needs: run it once from the main venv if this one lacks `gguf`).
    Returns the original folder when it already loads in vLLM (architectures named, embedding present).
    """
    from .. import models

    source = Path(name_or_path).expanduser()
    if not (source / "config.json").is_file():
        source = models.cache_dir() / name_or_path
        if not (source / "config.json").is_file():
            models.load(name_or_path)
    target = source.with_name(source.name + "-vllm")
    if (target / "config.json").is_file():
        return target
    config = json.loads((source / "config.json").read_text())
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(source / "model.safetensors"))
    needs_arch = not config.get("architectures")
    needs_embed = "model.embed_tokens.weight" not in tensors and "lm_head.weight" in tensors
    if not (needs_arch or needs_embed):
        return source
    model_type = config.get("model_type")
    if needs_arch:
        if model_type not in _ARCHITECTURES:
            raise ValueError(f"{source}: config.json names no architecture and model_type {model_type!r} is not one of {sorted(_ARCHITECTURES)}")
        config["architectures"] = [_ARCHITECTURES[model_type]]
    if needs_embed:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight") if config.get("tie_word_embeddings") else tensors["lm_head.weight"].clone()
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in ("config.json", "model.safetensors") and item.is_file():
            shutil.copy2(item, tmp / item.name)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    del torch
    tmp.rename(target)
    log.info("wrote the vLLM copy of %s to %s", source, target)
    return target
