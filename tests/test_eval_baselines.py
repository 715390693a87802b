"""Issue 18 in the evaluation harness: the QuantizedCache baselines through the runner and their bytes,
the grid's quantization flags and their errors, cell keys of older folders, the Pareto front, the report."""

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from sparkkv import CACHE_KWARG, PrefillCapture, SparKConfig, cli, models
from sparkkv.eval import baselines, report, runner, tasks
from sparkkv.eval.experiment import GridSpec, identity_config
from sparkkv.eval.grid import Quantization, build_grid, label, series
from sparkkv.eval.records import cell_key
from sparkkv.testbed import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "eval_128ae8c"


def _needs(backend: str):
    reason = baselines.unavailable(backend)
    return pytest.mark.skipif(reason is not None, reason=reason or "")


BASELINES = [pytest.param(m, marks=_needs(m.split("-")[0]), id=m) for m in baselines.METHODS]


@pytest.fixture(scope="module")
def testbed():
    return load_model()


def test_baselines_run_at_quantized_cache_defaults():
    from transformers.cache_utils import QuantizedLayer

    defaults = inspect.signature(QuantizedLayer.__init__).parameters
    assert defaults["q_group_size"].default == baselines.DEFAULT_GROUP_SIZE == 64
    assert defaults["residual_length"].default == baselines.DEFAULT_RESIDUAL_LENGTH == 128
    assert defaults["axis_key"].default == 0 and defaults["axis_value"].default == 0
    assert [baselines.parse(m).name for m in baselines.METHODS] == ["quanto-int4", "quanto-int2", "hqq-int4", "hqq-int2"]
    assert baselines.parse("spark") is None


def _prefill(model, b: int, s: int, seed: int):
    ids = torch.randint(5, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(seed))
    capture = PrefillCapture()
    with torch.no_grad():
        model(ids, **{CACHE_KWARG: capture})
    return capture


@_needs("quanto")
def test_quanto_builds_its_extension_under_the_build_guard(testbed, monkeypatch):
    """A quanto baseline loads quanto's CPU extension through `build.guarded_load` (stale-lock safe)
    before its cache exists, in quanto's own build folder."""
    from optimum.quanto.library.extensions import get_extension

    from sparkkv.kernels import build

    calls = []
    real = build.guarded_load
    monkeypatch.setattr(build, "guarded_load", lambda folder, key, load: calls.append((folder, key)) or real(folder, key, load))
    model, _ = testbed
    cache = baselines.prefill_cache(_prefill(model, 1, 80, 0), baselines.parse("quanto-int4"), model.config)
    assert calls == [(Path(get_extension("quanto_cpp").build_directory), "quanto_cpp")]
    assert cache.get_seq_length() == 80


@pytest.mark.parametrize("method", BASELINES)
def test_bytes_are_codes_scales_zeros_and_the_residual(testbed, method, seed):
    """cache_nbytes = per layer, for K and V: numel * bits / 8 bytes of packed codes + a float32 scale
    and zero (shift) per group of 64 channels of one token; then the dense residual tokens."""
    model, _ = testbed
    cfg = model.config
    config = baselines.parse(method)
    b, s = 2, 192
    h, d, layers = cfg.num_key_value_heads, cfg.head_dim, cfg.num_hidden_layers
    capture = _prefill(model, b, s, seed)
    cache = baselines.prefill_cache(capture, config, cfg)
    numel = b * h * s * d
    per_tensor = numel * config.nbits // 8 + 2 * 4 * numel // 64  # float32 model: float32 scales and zeros
    assert baselines.cache_nbytes(cache) == layers * 2 * per_tensor
    assert cache.get_seq_length() == s
    tokens = torch.tensor([7, 9])
    with torch.no_grad():
        for _ in range(3):
            model(tokens[:, None], **{CACHE_KWARG: cache})
    residual = 3 * b * h * d * 4  # float32 keys (and values) of the 3 decoded tokens, not yet quantized
    assert baselines.cache_nbytes(cache) == layers * 2 * (per_tensor + residual)


@pytest.mark.parametrize("method", BASELINES)
def test_baselines_through_the_runner_equal_their_own_prefill(testbed, method, seed):
    """Forked from the shared prefill, a QuantizedCache generates exactly what it generates after
    prefilling the prompt itself, and holds the same bytes."""
    model, tokenizer = testbed
    config = baselines.parse(method)
    samples = tasks.generate("passkey", tokenizer, 200, 2, seed % 1000, tasks.TaskInputs())
    for sample in samples:
        sample.max_new_tokens = 4
        sample.references = ["never generated"]  # no early stop
    results = []
    runner.run_batch(model, tokenizer, samples, {method: config}, lambda name, r: results.append(r))
    from transformers.cache_utils import QuantizedCache

    ids = torch.tensor([sample.input_ids for sample in samples])
    direct = QuantizedCache(backend=config.backend, config=model.config, nbits=config.nbits)
    with torch.no_grad():
        logits = model(ids, **{CACHE_KWARG: direct}).logits[:, -1]
        nbytes = baselines.cache_nbytes(direct)
        out = []
        for _ in range(4):
            token = logits.argmax(-1)
            out.append(token)
            logits = model(token[:, None], **{CACHE_KWARG: direct}).logits[:, -1]
    out = torch.stack(out, 1)
    for row, result in enumerate(results):
        want = [int(t) for t in out[row]]
        if tokenizer.eos_token_id in want:
            want = want[: want.index(tokenizer.eos_token_id)]
        assert result.prediction == tokenizer.decode(want, skip_special_tokens=True)
        assert result.kv_bytes == nbytes // len(samples)
        assert result.prompt_tokens == 200


@pytest.mark.parametrize("method", BASELINES)
def test_baseline_cells_on_the_command_line(method, capsys, tmp_path):
    out = tmp_path / "grid"
    code = cli.main(["eval", "--model", "testbed", "--tasks", "passkey", "--lengths", "200", "--n", "2",
                     "--methods", "dense", method, "none", "--key-bits", "4", "--value-bits", "4", "--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    records = {r["method"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    assert set(records) == {"dense", method, "none kq4 vq4"}
    base = records[method]
    assert base["config"] == {"cache": "QuantizedCache", **baselines.parse(method).__dict__}
    assert base["series"].endswith("(QuantizedCache)")
    bits = baselines.parse(method).nbits
    assert base["kv_vs_dense"] == pytest.approx((bits / 8 + 2 * 4 / 64) / 4)
    assert f"| {method} |" in stdout and "Pareto front" in stdout
    assert method in (out / "results.csv").read_text()
    assert (out / "score_vs_bytes_front.png").stat().st_size > 10_000


@pytest.mark.parametrize("method", BASELINES[:1])
def test_generate_with_a_baseline(method, capsys):
    from sparkkv.testbed import generate_samples

    prompt = generate_samples("passkey", 1, 300, 0)[0]
    code = cli.main(["generate", "--model", "testbed", "--prompt", prompt["prompt"], "--method", method, "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    answer, bytes_line = out.strip().splitlines()
    assert answer.split()[0] == prompt["answer"].split()[0]
    assert f"KV cache ({method}):" in bytes_line


# --- the grid -----------------------------------------------------------------------------------


def names(configs):
    return [label(c) for c in configs]


def test_grid_crosses_bits_value_ratios_group_sizes_and_mask_formats():
    quant = Quantization(key_bits=(16, 4), value_bits=(16, 2), value_ratios=(0.0, 0.8), group_sizes=(32, 64),
                         mask_formats=("bits", "trits"))
    configs = build_grid(["dense", "spark", "think", "none", "quanto-int4"], [0.8], [], quant)
    got = names(configs)
    assert got[0] == "dense" and got.count("dense") == 1  # dense: once, never quantized
    assert "quanto-int4" in got
    # spark: 2 value ratios x (1 unquantized + 3 quantized x 2 group sizes) x 2 mask formats
    assert len([n for n in got if n.startswith("spark")]) == 2 * (1 + 3 * 2) * 2
    assert "spark k0.8 v0.8 kq4 vq2 g32 trits" in got and "spark k0.8 trits" in got
    # think: no value pruning, no trits: 1 + 3 x 2
    assert sorted(n for n in got if n.startswith("think")) == sorted(
        ["think k0.8"] + [f"think k0.8{k}{v}{g}" for k, v in ((" kq4", ""), ("", " vq2"), (" kq4", " vq2")) for g in (" g32", "")])
    # none: plain quantization, 16/16 (= dense) left out
    assert "none" not in got and "none kq4 vq2" in got and "none vq2 g32" in got
    assert not any("g64" in n for n in got)  # the default group size is not named
    for config in configs[1:]:
        if isinstance(config, SparKConfig) and not config.quantized:
            assert config.quant_group_size == 64  # unquantized configurations keep the default


def test_grid_series_keep_old_lines_and_set_baselines_apart():
    spark, snap = SparKConfig(key_prune_ratio=0.8), SparKConfig(method="snapkv+spark", key_prune_ratio=0.8, token_budget=0.5)
    assert series(spark) == "spark" and series(snap) == "snapkv+spark b0.5" and series(None) == "dense"
    assert series(spark.replace(key_bits=4, value_bits=2)) == "spark kq4"
    assert series(spark.replace(value_bits=4)) == "spark kq16"
    assert series(baselines.parse("hqq-int2")) == "hqq (QuantizedCache)"


BAD_FLAGS = [
    (["--key-bits", "3"], "--key-bits"),
    (["--key-bits", "four"], "--key-bits"),
    (["--value-bits", "32"], "--value-bits"),
    (["--value-ratios", "1"], "--value-ratios"),
    (["--value-ratios", "-0.1"], "--value-ratios"),
    (["--value-ratios", "nan"], "--value-ratios"),
    (["--quant-group-size", "12"], "--quant-group-size"),
    (["--quant-group-size", "2048"], "--quant-group-size"),
    (["--quant-group-size", "0"], "--quant-group-size"),
    (["--mask-format", "quads"], "--mask-format"),
    (["--methods", "none"], "--methods"),  # 16/16 without a channel policy is dense
    (["--methods", "think", "--value-ratios", "0.8"], "--methods"),
    (["--methods", "think", "--mask-format", "trits"], "--methods"),
    (["--methods", "quanto-int3"], "--methods"),
]


@pytest.mark.parametrize("argv, flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_quantization_flags_are_one_line_exit_2(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    out = tmp_path / "o"
    code = cli.main(["eval", "--tasks", "niah_single_2", "--haystack", __file__, "--out", str(out), *argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
    assert argv[-1] in lines[0] or argv[-1] == "none"  # names the bad value
    assert not out.exists()


def test_a_missing_baseline_package_is_one_line_exit_2(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "unavailable", lambda backend: f"QuantizedCache(backend={backend!r}) needs the X package")
    code = cli.main(["eval", "--tasks", "passkey", "--model", "testbed", "--methods", "hqq-int2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "hqq-int2" in err and "--methods" in err


# --- cell keys of folders written before the quantization fields ----------------------------------


OLD_COMMAND = ["eval", "--model", "testbed", "--tasks", "passkey", "--lengths", "256", "--n", "2", "--methods", "dense",
               "spark", "think", "snapkv", "snapkv+spark", "--ratios", "0.8", "--budgets", "0.5", "--batch-size", "2",
               "--no-plots"]


def test_a_folder_written_before_the_quantization_fields_still_resumes(capsys, tmp_path, monkeypatch):
    out = tmp_path / "old"
    shutil.copytree(FIXTURE, out)
    before = {name: (out / name).read_bytes() for name in ("records.jsonl", "samples.jsonl")}
    monkeypatch.setattr(models, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a model was loaded")))
    code = cli.main(OLD_COMMAND + ["--out", str(out)])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert {name: (out / name).read_bytes() for name in before} == before  # every cell was found finished
    assert "| snapkv+spark k0.8 b0.5 |" in stdout


def test_identity_drops_only_the_new_fields_at_their_defaults():
    old = json.loads((FIXTURE / "records.jsonl").read_text().splitlines()[1])
    config = SparKConfig.from_dict(old["config"])  # a record of 128ae8c: none of the new fields
    assert identity_config(config) == old["config"]
    spec = GridSpec(model="testbed", tasks=["passkey"], lengths=[256], n=2, configs=[config])
    assert cell_key(spec.identity("passkey", 256, config)) == old["key"]
    quantized = config.replace(key_bits=4, quant_group_size=32, mask_format="trits")
    got = identity_config(quantized)
    assert got["key_bits"] == 4 and got["quant_group_size"] == 32 and got["mask_format"] == "trits"
    assert "value_bits" not in got
    assert cell_key(spec.identity("passkey", 256, quantized)) != old["key"]
    assert identity_config(None) is None
    assert identity_config(baselines.parse("quanto-int2"))["backend"] == "quanto"


# --- the Pareto front ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "points, lower, want",
    [
        ([], False, []),
        ([(1.0, 0.5)], False, [0]),
        # bytes, score: the dominated (0.6, 0.7) and (0.9, 0.8) drop out
        ([(1.0, 1.0), (0.6, 0.7), (0.5, 0.9), (0.9, 0.8), (0.2, 0.1)], False, [4, 2, 0]),
        # equal bytes: the better score; equal scores: the fewer bytes
        ([(0.5, 0.8), (0.5, 0.9), (0.3, 0.9)], False, [2]),
        # exact ties: the first given
        ([(0.5, 0.8), (0.5, 0.8)], False, [0]),
        # perplexity: lower is better
        ([(1.0, 18.7), (0.5, 20.0), (0.3, 19.0), (0.1, 70.0)], True, [3, 2, 0]),
        # non-finite points are never on the front
        ([(0.5, float("nan")), (0.6, 0.2), (float("inf"), 1.0)], False, [1]),
        # a worse score at more bytes is dominated even far away
        ([(0.1, 1.0), (0.9, 0.95), (0.05, 0.0)], False, [2, 0]),
    ],
)
def test_pareto_front_hand_cases(points, lower, want):
    assert report.pareto_front(points, lower) == want


def _record(method, task, length, vs, score, config="spark"):
    cfg = {None: None, "spark": {"method": "spark"}, "quant": {"method": "none", "key_bits": 4, "value_bits": 4},
           "base": {"cache": "QuantizedCache", "backend": "quanto", "nbits": 4}}[config]
    return {"method": method, "task": task, "length": length, "kv_vs_dense": vs, "kv_bytes_per_token": vs * 46080,
            "score": score, "config": cfg, "model": "m", "n": 2, "dense_bytes_per_token": 46080,
            "series": "quanto (QuantizedCache)" if config == "base" else method}


def test_fronts_pick_tables_and_plots(tmp_path):
    records = [
        _record("dense", "niah", 2048, 1.0, 1.0, None),
        _record("spark k0.8", "niah", 2048, 0.64, 0.9),
        _record("quanto-int4", "niah", 2048, 0.156, 0.9, "base"),
        _record("none kq4 vq4", "niah", 2048, 0.141, 0.95, "quant"),
        _record("dense", "perplexity", 1024, 1.0, 18.7, None),
        _record("quanto-int4", "perplexity", 1024, 0.156, 19.5, "base"),
        _record("none kq4 vq4", "perplexity", 1024, 0.141, 19.0, "quant"),
    ]
    got = report.fronts(records)
    assert [r["method"] for r in got[("niah", 2048)]] == ["none kq4 vq4", "dense"]
    assert [r["method"] for r in got[("perplexity", 1024)]] == ["none kq4 vq4", "dense"]
    table = report.front_table(records)
    assert "none kq4 vq4" in table and "quanto-int4" not in table
    picks = report.pick_table(records, budgets=(1.0, 0.5, 0.1))
    assert "| <= 1x | dense (1.000) | dense (18.70) |" in picks
    assert "| <= 0.5x | none kq4 vq4 (0.950) | none kq4 vq4 (19.00) |" in picks
    assert "| <= 0.1x | - | - |" in picks
    versus = report.baseline_table(records)
    assert "| niah @2048 | quanto-int4 | 0.156 | 0.900 | none kq4 vq4 | 0.141 | 0.950 | at least as good |" in versus
    assert "| perplexity @1024 | quanto-int4 | 0.156 | 19.50 | none kq4 vq4 | 0.141 | 19.00 | at least as good |" in versus
    assert report.baseline_table(records[:2]) == ""
    assert report.family(records[2]) == "baseline" and report.family(records[3]) == "sparkkv quantized"
    paths = report.plot(records, tmp_path)
    assert {"score_vs_kv_bytes.png", "score_vs_bytes_front.png"} <= {p.name for p in paths}
    assert (tmp_path / "score_vs_bytes_front.png").stat().st_size > 10_000


def test_description_gives_n_per_column_when_the_columns_differ():
    """A report over folders run at different n names each column's n (2k n = 50 beside 4k n = 20)."""
    same = [_record("dense", "niah", 2048, 1.0, 1.0, None), _record("dense", "perplexity", 1024, 1.0, 18.7, None)]
    assert "n = 2 per cell;" in report.describe(same)
    mixed = same + [dict(_record("dense", "niah", 4096, 1.0, 1.0, None), n=20)]
    assert "n per cell: niah @2048 2, ppl @1024 2, niah @4096 20;" in report.describe(mixed)
