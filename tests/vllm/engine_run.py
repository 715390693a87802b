"""Run one vLLM engine on SmolLM2-135M and print its results as JSON (a child process of the tests:
every engine gets a fresh process, as vLLM expects).

    python tests/vllm/engine_run.py '{"engine": {...LLM kwargs...}, "prompts": [...], "max_tokens": 32}'

Prints one line `RESULT {"texts": [...], "token_ids": [...], "logprobs": [[{id: logprob}, ...]], "kv_tokens": N}`.
Prompts are chat messages (one user turn each), run one at a time (batch composition changes stock
output too).
"""

import json
import sys

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    from sparkkv.vllm.models import vllm_model_dir

    engine = {"model": str(vllm_model_dir()), "enforce_eager": True, "max_model_len": 2048, "seed": 0, **spec.get("engine", {})}
    llm = LLM(**engine)
    cache = llm.llm_engine.vllm_config.cache_config
    params = SamplingParams(max_tokens=spec.get("max_tokens", 32), temperature=0, logprobs=5)
    result = {"texts": [], "token_ids": [], "logprobs": [], "kv_tokens": int(cache.num_gpu_blocks) * int(cache.block_size)}
    for prompt in spec["prompts"]:
        out = llm.chat([[{"role": "user", "content": prompt}]], params, use_tqdm=False)[0].outputs[0]
        result["texts"].append(out.text)
        result["token_ids"].append(list(out.token_ids))
        result["logprobs"].append([{str(k): v.logprob for k, v in step.items()} for step in out.logprobs])
    print("RESULT " + json.dumps(result), flush=True)
