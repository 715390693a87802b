"""`SparKCpuPlatform`: vLLM's CPU platform, except that it honours `attention_backend="CUSTOM"`.

vLLM 0.32's `CpuPlatform.get_attn_backend_cls` returns CPU_ATTN whatever backend was asked for, so an
out-of-tree backend is reachable on CPU only through a platform plugin (`vllm.platform_plugins`,
`sparkkv.vllm:platform_plugin`). Everything else is inherited: a run that does not ask for CUSTOM
behaves exactly as stock vLLM (tests/vllm check the generated text).

With CUSTOM selected, `check_and_update_config` also validates `additional_config["sparkkv"]` (one
`ValueError` naming the bad field, raised in the process that builds the config, before any engine
process starts) and applies the prefill handling (`settings.py`): chunked prefill and prefix caching
are turned off unless `vllm_chunked_prefill` / `vllm_prefix_caching` keep them.
"""

from __future__ import annotations

import logging

from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from . import settings

log = logging.getLogger(__name__)

BACKEND_PATH = "sparkkv.vllm.backend.SparKAttentionBackend"


def _custom_selected(vllm_config) -> bool:
    attention_config = getattr(vllm_config, "attention_config", None)
    return getattr(attention_config, "backend", None) == AttentionBackendEnum.CUSTOM


class SparKCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
            return AttentionBackendEnum.CUSTOM.get_path()
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super().check_and_update_config(vllm_config)
        if not _custom_selected(vllm_config):
            return
        parsed = settings.parse(vllm_config.additional_config)
        model_config = vllm_config.model_config
        if model_config is not None and getattr(model_config, "use_mla", False):
            raise ValueError("sparkkv.vllm: the SparK backend serves multi-head / grouped-query attention, not MLA models")
        scheduler = vllm_config.scheduler_config
        if not parsed.chunked_prefill and scheduler.enable_chunked_prefill:
            scheduler.enable_chunked_prefill = False
            if model_config is not None:
                scheduler.max_num_batched_tokens = max(scheduler.max_num_batched_tokens, model_config.max_model_len)
            log.info("sparkkv.vllm: chunked prefill off (a prompt is scored with its own last %d queries)",
                     parsed.config.window_size)
        if not parsed.prefix_caching and vllm_config.cache_config.enable_prefix_caching:
            vllm_config.cache_config.enable_prefix_caching = False
            log.info("sparkkv.vllm: prefix caching off")
