"""`additional_config={"sparkkv": {...}}` -> validated settings (shared by the platform and the backend).

The dict holds `SparKConfig` fields (`key_prune_ratio`, `value_prune_ratio`, `recovery`,
`attention_backend`, ...) plus these plugin options:

    vllm_chunked_prefill  bool, default False: keep vLLM's chunked prefill. False: the platform turns
                          it off, so a prompt is prefilled in one forward and its keys are scored with
                          the prompt's own last `window_size` queries, as the transformers path does.
                          True: each chunk is scored with its own last queries.
    vllm_prefix_caching   bool, default False: keep vLLM's prefix caching. A shared page keeps the
                          query norms of the request that wrote it (its header), so it decodes the
                          same for every reader, but its channels were chosen by another prompt's
                          queries. Turns `vllm_recent_tokens` off (a ring is keyed by the request's
                          first page, which prefix caching shares between requests).
    vllm_recent_tokens    int in [0, 1024], default 16: each request's last this-many generated
                          tokens are also kept as exact copies (keys and values, model dtype) in a
                          per-layer ring outside vLLM's KV pool and attended from there instead of
                          from their records; the records still hold every token. The transformers
                          path keeps generated tokens dense until `block_size` of them accumulate;
                          a record is compressed as it is written, and the needle accuracy measured
                          through vLLM (docs/vllm.md) is what this buys back. 0 turns it off.

Unknown fields and bad values raise one `ValueError` whose message names the field and the
allowed values (`SparKConfig.from_dict` does the checking of the library's fields).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SparKConfig

KEY = "sparkkv"
PLUGIN_OPTIONS = {"vllm_chunked_prefill": False, "vllm_prefix_caching": False}
RECENT_TOKENS = ("vllm_recent_tokens", 16, 1024)  # name, default, largest


@dataclass(frozen=True)
class Settings:
    config: SparKConfig
    chunked_prefill: bool = False
    prefix_caching: bool = False
    recent_tokens: int = RECENT_TOKENS[1]


def parse(additional_config) -> Settings:
    """`additional_config` (vLLM's dict, may be None or empty) -> `Settings`; ValueError on bad input."""
    raw = {}
    if isinstance(additional_config, dict):
        raw = additional_config.get(KEY, {})
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"sparkkv.vllm: additional_config['{KEY}'] must be a dict of SparKConfig fields, got {type(raw).__name__}")
    fields = dict(raw)
    options = {}
    for name, default in PLUGIN_OPTIONS.items():
        value = fields.pop(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"sparkkv.vllm: additional_config['{KEY}']['{name}'] must be true or false, got {value!r}")
        options[name] = value
    name, default, top = RECENT_TOKENS
    recent = fields.pop(name, default)
    if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= top:
        raise ValueError(f"sparkkv.vllm: additional_config['{KEY}']['{name}'] must be an integer in [0, {top}], got {recent!r}")
    if options["vllm_prefix_caching"]:
        recent = 0
    try:
        config = SparKConfig.from_dict(fields)
        from .records import check_config

        check_config(config)
    except (TypeError, ValueError) as exc:
        message = str(exc).removeprefix("sparkkv.vllm: ")
        raise ValueError(f"sparkkv.vllm: bad additional_config['{KEY}']: {message}") from None
    return Settings(config, options["vllm_chunked_prefill"], options["vllm_prefix_caching"], recent)


_cached: Settings | None = None


def current() -> Settings:
    """The settings of the running engine (read from the current vLLM config, cached per process)."""
    global _cached
    from vllm.config import get_current_vllm_config_or_none

    vllm_config = get_current_vllm_config_or_none()
    if vllm_config is not None:
        _cached = parse(vllm_config.additional_config)
    if _cached is None:
        _cached = parse({})
    return _cached
