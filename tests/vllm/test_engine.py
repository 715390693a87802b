"""sparkkv.vllm in real vLLM engines on SmolLM2-135M-Instruct (CPU build of vLLM; each engine in its
own process, about a minute each): the plugin loads, ratio 0 reproduces stock CPU_ATTN prompt by
prompt, stock runs are unchanged by installing sparkkv, bad configuration fails at startup in one
line, SparK k0.8 gets a larger KV cache, and `vllm serve` answers HTTP clients with the plugin on."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm.v1.attention.backend", reason="vLLM is not installed (tests/vllm need the vLLM venv)")

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that adds two numbers.",
    "Explain photosynthesis in one paragraph.",
    "List three colors of the rainbow.",
    "Who wrote Romeo and Juliet?",
]
# A greedy step where the two top logits are this close (in stock's own log-probabilities) is a
# tie that a different summation order may break the other way.
TIE_NATS = 0.1
# The ratio-0 comparison runs both engines in float32. In bfloat16 the logits are bfloat16 numbers,
# 0.125 apart where SmolLM2's top logits lie, so exact ties are common: there 2 of 5 prompts were
# identical, every difference at a gap of one or two such steps; in float32 all 5 were.
EXACT = {"dtype": "float32"}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "1800")  # a loaded 2-core machine is slow
    env.update(extra)
    return env


def _model_or_skip():
    from sparkkv.vllm.models import vllm_model_dir

    try:
        return vllm_model_dir()
    except Exception as exc:  # noqa: BLE001  (no model here: fetch it from the main venv first)
        pytest.skip(f"SmolLM2-135M is not available ({type(exc).__name__}: {exc}); run "
                    "`python -c \"import sparkkv; sparkkv.models.load('smollm2-135m')\"` in the main venv")


def _run(cmd: list[str], env: dict, timeout: int) -> tuple[int, str, str]:
    """Run `cmd` in its own process group with its output in files (not pipes: an engine worker that
    outlives its parent for a while would keep a pipe open), then end whatever is left of the group."""
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0), err.seek(0)
        return code, out.read(), err.read()


def run_engine(engine: dict, prompts=PROMPTS, max_tokens=32, env=None) -> dict:
    _model_or_skip()
    spec = json.dumps({"engine": engine, "prompts": prompts, "max_tokens": max_tokens})
    code, stdout, stderr = _run([sys.executable, str(HERE / "engine_run.py"), spec], env or _env(), 900)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert code == 0 and lines, (stdout + stderr)[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def stock():
    return run_engine({})


def _same_or_tie(ref: dict, got: dict, i: int) -> str | None:
    """None when prompt i's greedy tokens agree, or first differ at a step where stock's own top
    two log-probabilities are within TIE_NATS and the plugin took the other of them; else why not."""
    a, b = ref["token_ids"][i], got["token_ids"][i]
    if a == b:
        return None
    step = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if step >= min(len(a), len(b)):
        return f"prompt {i}: one output is a prefix of the other ({len(a)} vs {len(b)} tokens)"
    lp = ref["logprobs"][i][step]
    gap = lp[str(a[step])] - lp.get(str(b[step]), float("-inf"))
    if gap <= TIE_NATS:
        return None
    return f"prompt {i} differs at token {step}: stock {a[step]} vs plugin {b[step]}, stock logprob gap {gap:.3f} nats"


def test_ratio_zero_matches_stock_prompt_by_prompt():
    stock = run_engine(EXACT)
    got = run_engine({**EXACT, "attention_backend": "CUSTOM", "additional_config": {"sparkkv": {"key_prune_ratio": 0.0}}})
    problems = [p for i in range(len(PROMPTS)) if (p := _same_or_tie(stock, got, i))]
    assert not problems, problems
    exact = sum(a == b for a, b in zip(stock["token_ids"], got["token_ids"]))
    assert exact >= len(PROMPTS) - 1, f"only {exact} of {len(PROMPTS)} prompts identical"


def test_stock_run_unchanged_by_installing_sparkkv(stock):
    """VLLM_PLUGINS="" loads no plugin at all: the stock engine must give the same tokens and
    log-probabilities as with sparkkv's platform plugin active."""
    plain = run_engine({}, env=_env(VLLM_PLUGINS=""))
    assert plain["token_ids"] == stock["token_ids"]
    assert plain["kv_tokens"] == stock["kv_tokens"]
    for a, b in zip(plain["logprobs"], stock["logprobs"]):
        assert a == b


def test_spark_k08_larger_cache_and_sane_text(stock):
    got = run_engine({"attention_backend": "CUSTOM", "additional_config": {"sparkkv": {"key_prune_ratio": 0.8}}},
                     prompts=PROMPTS[:2])
    assert got["kv_tokens"] / stock["kv_tokens"] >= 1.45, (got["kv_tokens"], stock["kv_tokens"])
    assert "Paris" in got["texts"][0]
    assert "def " in got["texts"][1]


def test_bad_config_is_one_line_at_startup():
    _model_or_skip()
    code = ("from vllm import LLM\nfrom sparkkv.vllm.models import vllm_model_dir\nif __name__ == '__main__':\n"
            "    LLM(model=str(vllm_model_dir()), attention_backend='CUSTOM', enforce_eager=True,\n"
            "        additional_config={'sparkkv': {'key_prune_ratio': 1.5}})\n")
    start = time.time()
    returncode, _, stderr = _run([sys.executable, "-c", code], _env(), 600)
    assert returncode != 0
    lines = [line for line in stderr.splitlines() if "sparkkv.vllm: bad additional_config" in line]
    assert lines, stderr[-3000:]
    assert "key_prune_ratio must be a number in [0, 1), got 1.5" in lines[-1]
    assert "(EngineCore pid=" not in stderr and "(Worker pid=" not in stderr  # no engine process started
    assert time.time() - start < 300


def serve_command() -> list[str]:
    """`vllm serve` where vLLM's CLI works; with vllm-cpu its CLI stops at once (it asks for the
    version of a distribution named "vllm", and vllm-cpu's is named "vllm-cpu"), so the same server
    is started from its module, which takes the same arguments (docs/vllm.md)."""
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return [str(Path(sys.executable).with_name("vllm")), "serve"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_http_clients():
    model = _model_or_skip()
    port = _free_port()
    cmd = [*serve_command(), str(model), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
           "--max-model-len", "2048", "--served-model-name", "smollm2", "--attention-backend", "CUSTOM",
           "--additional-config", json.dumps({"sparkkv": {"key_prune_ratio": 0.8}})]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"sparkkv-vllm-serve-{port}.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, f"vllm serve exited with {server.returncode}; see {log.name}"
            try:
                with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, f"vllm serve did not come up in 600 s; see {log.name}"
            time.sleep(2)
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 16, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert "Paris" in answer["choices"][0]["message"]["content"]
        import openai

        client = openai.OpenAI(base_url=base + "/v1", api_key="none")
        completion = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
        assert completion.choices[0].text.strip()
    finally:
        import signal

        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(server.pid, signal.SIGKILL)  # the server's engine processes, if any are left
        except ProcessLookupError:
            pass
        log.close()
