"""sparkkv.vllm under tensor parallelism 2 on CPU (two worker processes, one core each): at ratio 0 the
plugin's greedy tokens equal stock CPU_ATTN's, and k0.8 runs with its larger cache. SmolLM2's 9 query
heads do not split over 2 ranks and no pretrained model whose heads do is available here, so the model
is a random 2-layer Llama (4 query / 2 KV heads of 64, SmolLM2's tokenizer) built in the test; its
weights are drawn wide (initializer_range 0.2) so that greedy steps are far from ties, and the engines
run in float32."""

import os

import pytest

pytest.importorskip("vllm.v1.attention.backend", reason="vLLM is not installed (tests/vllm need the vLLM venv)")

from test_engine import _env, _model_or_skip, run_engine  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


@pytest.fixture(scope="module")
def tiny_tp_model(tmp_path_factory):
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = _model_or_skip()
    folder = tmp_path_factory.mktemp("tiny_tp2")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=64, vocab_size=49152, max_position_embeddings=4096,
                      rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json"):
            shutil.copy(f, folder / f.name)
    return folder


def _tp(model, **engine):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("tensor parallel 2 on CPU needs 2 cores")
    spec = {"model": str(model), "tensor_parallel_size": 2, "dtype": "float32", "max_model_len": 1024, **engine}
    return run_engine(spec, prompts=PROMPTS, max_tokens=16, env=_env(VLLM_CPU_OMP_THREADS_BIND="0|1"))


def test_tensor_parallel_2_ratio_zero_equals_stock_and_k08_runs(tiny_tp_model):
    stock = _tp(tiny_tp_model)
    plain = _tp(tiny_tp_model, attention_backend="CUSTOM", additional_config={"sparkkv": {"key_prune_ratio": 0.0}})
    assert plain["token_ids"] == stock["token_ids"]
    spark = _tp(tiny_tp_model, attention_backend="CUSTOM", additional_config={"sparkkv": {"key_prune_ratio": 0.8}})
    assert all(len(ids) == 16 for ids in spark["token_ids"])
    assert spark["kv_tokens"] / stock["kv_tokens"] >= 1.45, (spark["kv_tokens"], stock["kv_tokens"])
