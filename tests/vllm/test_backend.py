"""The SparK attention impl (sparkkv.vllm.backend) driven directly, without an engine: a vLLM-shaped
page view, hand-built metadata (block table, slot mapping, query starts), a prefill then decode
steps, against a float64 reference built from the library's own `compress_keys(...).dense()`."""

import math

import pytest
import torch

vllm_backend = pytest.importorskip("vllm.v1.attention.backend", reason="vLLM is not installed (tests/vllm need the vLLM venv)")

import sparkkv  # noqa: E402
from sparkkv.method import window_query_norm  # noqa: E402
from sparkkv.quant import QuantizedTensor  # noqa: E402
from sparkkv.vllm import settings  # noqa: E402
from sparkkv.vllm.backend import SparKAttentionBackend, SparKAttentionImpl, SparKMetadata  # noqa: E402


def _kv_view(spec, num_blocks):
    """What vLLM hands a layer: `[num_blocks, 1, block_size, C]` in the model dtype over pages of
    `spec.page_size_bytes` (LBHNC layout, page padding at the end of each page)."""
    page = spec.page_size_bytes
    raw = torch.zeros(num_blocks * page, dtype=torch.uint8)
    item = spec.dtype.itemsize
    c = spec.state_content_bytes // item
    return torch.as_strided(raw.view(spec.dtype), (num_blocks, 1, spec.block_size, c), (page // item, c * spec.block_size, c, 1))


def _setup(monkeypatch, fields, h=3, g=3, d=64, bs=16, dtype=torch.bfloat16):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    monkeypatch.setattr(settings, "_cached", settings.parse({"sparkkv": fields}))
    monkeypatch.setattr("vllm.config.get_current_vllm_config_or_none", lambda: None)
    spec = SparKAttentionBackend.customize_spec(FullAttentionSpec(block_size=bs, num_kv_heads=h, head_size=d, dtype=dtype))
    impl = SparKAttentionImpl(num_heads=h * g, head_size=d, scale=d**-0.5, num_kv_heads=h)
    return spec, impl


class Request:
    def __init__(self, prompt, h, g, d, dtype, blocks):
        self.q = torch.randn(prompt, h * g, d).to(dtype)
        self.k = torch.randn(prompt, h, d).to(dtype)
        self.v = torch.randn(prompt, h, d).to(dtype)
        self.blocks = blocks
        self.done = 0  # tokens in the pages

    def step(self, n):
        """(q, k, v) of the next n tokens (generated on the fly past the prompt)."""
        while self.q.shape[0] < self.done + n:
            for name in ("q", "k", "v"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, torch.randn(1, *t.shape[1:]).to(t.dtype)]))
        sl = slice(self.done, self.done + n)
        return self.q[sl], self.k[sl], self.v[sl]


def _run_step(impl, kv, bs, reqs, lengths, prompt_lens):
    qs, ks, vs, qsl, seqs, slots, pre = [], [], [], [0], [], [], []
    for req, n in zip(reqs, lengths):
        q, k, v = req.step(n)
        qs.append(q), ks.append(k), vs.append(v)
        pos = torch.arange(req.done, req.done + n)
        slots.append(req.blocks[pos // bs] * bs + pos % bs)
        seqs.append(req.done + n)
        pre.append(req.done < prompt_lens[reqs.index(req)])
        qsl.append(qsl[-1] + n)
    width = max(len(r.blocks) for r in reqs)
    table = torch.stack([torch.nn.functional.pad(r.blocks, (0, width - len(r.blocks))) for r in reqs]).int()
    meta = SparKMetadata(num_actual_tokens=qsl[-1], num_reqs=len(reqs), query_start_loc=qsl, seq_lens=seqs,
                         prefilling=pre, block_table=table, slot_mapping=torch.cat(slots))
    q, k, v = torch.cat(qs), torch.cat(ks), torch.cat(vs)
    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], dtype=q.dtype)
    impl.forward(None, q, k, v, kv, meta, output=out)
    for req, n in zip(reqs, lengths):
        req.done += n
    return out, qsl


def _reference(req, config, prompt_len, pos, h, g, d, window, recent=0):
    """float64 attention of query `pos` over keys 0..pos: prompt keys and earlier decode keys as the
    library compresses them with the prompt's qn (own key dense), values dense or, with `value_bits`
    < 16, as the library quantizes them per token (own value dense); the last `recent` generated
    tokens before `pos` (`vllm_recent_tokens`) exact, keys and values."""
    qn = window_query_norm(req.q[prompt_len - window:prompt_len].transpose(0, 1).unsqueeze(0), h)
    keys = req.k[:pos].transpose(0, 1).unsqueeze(0)
    stored = sparkkv.compress_keys(keys, None, config, qn=qn).dense(torch.float32).double() if pos else keys.double()
    kall = torch.cat([stored, req.k[pos:pos + 1].transpose(0, 1).unsqueeze(0).double()], dim=2)[0]  # [H, pos+1, D]
    vall = req.v[: pos + 1].transpose(0, 1).double()
    if config.value_bits < 16 and pos:
        stored_v = QuantizedTensor.quantize(req.v[:pos].transpose(0, 1).unsqueeze(0), config.value_bits, config.quant_group_size, "row")
        vall = torch.cat([stored_v.dense(torch.float64)[0], vall[:, pos:]], dim=1)
    exact = min(recent, pos - prompt_len)
    if exact > 0:
        kall[:, pos - exact:pos] = req.k[pos - exact:pos].transpose(0, 1).double()
        vall[:, pos - exact:pos] = req.v[pos - exact:pos].transpose(0, 1).double()
    q = req.q[pos].view(h, g, d).double()
    logits = torch.einsum("hgd,hsd->hgs", q, kall) * d**-0.5
    return torch.einsum("hgs,hsd->hgd", logits.softmax(-1), vall).reshape(h * g, d)


@pytest.mark.parametrize("path,tol", [("torch", 2e-2), ("cpu", 3e-2)])
@pytest.mark.parametrize("ratio,value_bits,recent", [(0.0, 16, 0), (0.8, 16, 0), (0.8, 4, 0), (0.0, 2, 0), (0.8, 16, 5), (0.8, 2, 16)])
def test_prefill_then_decode_matches_reference(monkeypatch, seed, path, tol, ratio, value_bits, recent):
    """`recent` 5: the ring wraps around during the 12 decode steps; 16: it never fills."""
    h, g, d, bs = 3, 3, 64, 16
    fields = {"key_prune_ratio": ratio, "attention_backend": path, "value_bits": value_bits, "quant_group_size": 32}
    spec, impl = _setup(monkeypatch, {**fields, "vllm_recent_tokens": recent}, h, g, d, bs)
    kv = _kv_view(spec, 64)
    config = sparkkv.SparKConfig(**fields)
    prompts = [37, 70]
    perm = torch.randperm(63) + 1
    reqs = [Request(prompts[0], h, g, d, torch.bfloat16, perm[:4]), Request(prompts[1], h, g, d, torch.bfloat16, perm[4:10])]
    out, _ = _run_step(impl, kv, bs, reqs, prompts, prompts)
    # prefill output: dense causal attention over the prompt
    for req, (a, b) in zip(reqs, [(0, 37), (37, 107)]):
        dense = torch.nn.functional.scaled_dot_product_attention(
            req.q[:b - a].transpose(0, 1).unsqueeze(0).float(), req.k[:b - a].transpose(0, 1).unsqueeze(0).float(),
            req.v[:b - a].transpose(0, 1).unsqueeze(0).float(), is_causal=True, scale=d**-0.5, enable_gqa=True)
        # the output is bfloat16: rounding alone moves an entry by up to half a step (2^-8 relative;
        # seed 769095270 hit 0.0149 at a value of 4.05), so one step relative on top of the atol
        torch.testing.assert_close(out[a:b].float(), dense[0].transpose(0, 1), rtol=2**-7, atol=1e-2)
    for step in range(12):  # crosses a page boundary for request 0 (37 + 12 > 48)
        out, qsl = _run_step(impl, kv, bs, reqs, [1, 1], prompts)
        for i, req in enumerate(reqs):
            ref = _reference(req, config, prompts[i], req.done - 1, h, g, d, min(32, prompts[i]), recent)
            err = (out[qsl[i]].double() - ref).norm() / ref.norm()
            assert err < tol, (step, i, float(err))


def test_recent_ring_starts_clean_for_a_new_request_on_the_same_pages(monkeypatch, seed):
    """A finished request's pages go to a new request: its prefill drops the old ring (same first
    page), so its decode steps attend to its own generated tokens exactly and to nothing of the old."""
    h, g, d, bs, w = 2, 2, 64, 16, 4
    spec, impl = _setup(monkeypatch, {"key_prune_ratio": 0.8, "attention_backend": "cpu", "vllm_recent_tokens": w}, h, g, d, bs)
    kv = _kv_view(spec, 16)
    config = sparkkv.SparKConfig(key_prune_ratio=0.8)
    blocks = torch.tensor([9, 2, 14, 6])
    for prompt in (29, 36):  # the old ring ends at 29 + 7 = 36: only the prefill's drop keeps it out
        req = Request(prompt, h, g, d, torch.bfloat16, blocks)
        _run_step(impl, kv, bs, [req], [prompt], [prompt])
        for step in range(7):
            out, _ = _run_step(impl, kv, bs, [req], [1], [prompt])
            ref = _reference(req, config, prompt, req.done - 1, h, g, d, min(32, prompt), w)
            assert (out[0].double() - ref).norm() / ref.norm() < 3e-2, (prompt, step)
        assert list(impl._recent) == [9] and impl._recent[9].filled == w


def test_chunked_prefill_pages_keep_their_first_qn(monkeypatch, seed):
    """A prompt in two chunks whose boundary falls inside a page: the rest of that page is compressed
    with the first chunk's qn (its header), later pages with the second chunk's; decode steps then
    read two runs of pages and still match attention over the keys compressed that way."""
    h, g, d, bs = 2, 2, 64, 16
    spec, impl = _setup(monkeypatch, {"key_prune_ratio": 0.8, "attention_backend": "torch"}, h, g, d, bs)
    kv = _kv_view(spec, 16)
    req = Request(50, h, g, d, torch.float32 if False else torch.bfloat16, torch.tensor([7, 3, 11, 5]))
    _run_step(impl, kv, bs, [req], [20], [50])
    _run_step(impl, kv, bs, [req], [30], [50])
    from sparkkv.vllm.records import RecordLayout

    layout = RecordLayout.create(sparkkv.SparKConfig(key_prune_ratio=0.8), h, d, bs, torch.bfloat16)
    pages = torch.as_strided(kv.view(torch.uint8), (16, spec.page_size_bytes), (kv.view(torch.uint8).stride(0), 1))
    hdr = layout.header(pages)
    qn1 = window_query_norm(req.q[:20].transpose(0, 1).unsqueeze(0)[:, :, -20:], h)[0]
    qn2 = window_query_norm(req.q[20:50].transpose(0, 1).unsqueeze(0), h)[0]
    assert torch.equal(hdr[7], qn1) and torch.equal(hdr[3], qn1)  # page 3 holds tokens 16..31
    assert torch.equal(hdr[11], qn2) and torch.equal(hdr[5], qn2)
    out, _ = _run_step(impl, kv, bs, [req], [1], [50])
    config = sparkkv.SparKConfig(key_prune_ratio=0.8)
    k = req.k[:50].transpose(0, 1).unsqueeze(0)
    stored = torch.cat([sparkkv.compress_keys(k[:, :, :32], None, config, qn=qn1.unsqueeze(0)).dense(torch.float32),
                        sparkkv.compress_keys(k[:, :, 32:], None, config, qn=qn2.unsqueeze(0)).dense(torch.float32)], 2)
    kall = torch.cat([stored, req.k[50:51].transpose(0, 1).unsqueeze(0).float()], 2)[0].double()
    q = req.q[50].view(h, g, d).double()
    ref = torch.einsum("hgs,hsd->hgd", (torch.einsum("hgd,hsd->hgs", q, kall) / math.sqrt(d)).softmax(-1),
                       req.v[:51].transpose(0, 1).double()).reshape(h * g, d)
    assert (out[0].double() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("length,h,g,d", [(1, 2, 4, 64), (37, 3, 3, 64), (129, 1, 8, 128), (300, 8, 1, 64), (257, 4, 2, 32)])
def test_prompt_through_vllm_cpu_kernel_matches_float64(seed, dtype, tol, length, h, g, d):
    """The CPU paths' prompt attention (vLLM's own CPU kernel over a scratch dense cache) against
    float64 causal attention: odd lengths, one and several pages, GQA groups 1 / 2 / 3 / 4 / 8."""
    from sparkkv.vllm.backend import _stock_prompt_attention, _stock_prompt_serves

    q = torch.randn(length, h * g, d).to(dtype)
    k, v = torch.randn(length, h, d).to(dtype), torch.randn(length, h, d).to(dtype)
    assert _stock_prompt_serves(q)
    out = _stock_prompt_attention(q, k, v, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    f = lambda t: t.transpose(0, 1).unsqueeze(0).double()  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(f(q), f(k), f(v), is_causal=True, scale=d**-0.5, enable_gqa=True)
    err = (out.double() - ref[0].transpose(0, 1)).norm() / ref.norm()
    assert err < tol, float(err)


def test_prompt_path_falls_back_where_vllm_kernel_does_not_serve():
    from sparkkv.vllm.backend import _stock_prompt_serves

    assert not _stock_prompt_serves(torch.zeros(4, 2, 40))  # head size CPU_ATTN does not serve
    assert not _stock_prompt_serves(torch.zeros(4, 2, 64, dtype=torch.float64))


def test_page_size_follows_records(monkeypatch):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    stock = FullAttentionSpec(block_size=128, num_kv_heads=3, head_size=64, dtype=torch.bfloat16)
    spec, _ = _setup(monkeypatch, {"key_prune_ratio": 0.8}, 3, 3, 64, 128)
    assert stock.page_size_bytes == 128 * 3 * 256
    assert spec.page_size_bytes == 128 * 3 * 172 + 3 * 64 * 4
    assert stock.page_size_bytes / spec.page_size_bytes > 1.47


def test_bad_additional_config_is_one_line():
    with pytest.raises(ValueError) as info:
        settings.parse({"sparkkv": {"key_prune_ratio": 1.5}})
    message = str(info.value)
    assert "\n" not in message and "key_prune_ratio" in message and "[0, 1)" in message
    with pytest.raises(ValueError, match="unknown SparKConfig fields"):
        settings.parse({"sparkkv": {"key_prune": 0.5}})
    with pytest.raises(ValueError, match="vllm_prefix_caching"):
        settings.parse({"sparkkv": {"vllm_prefix_caching": "yes"}})
    for bad in (-1, 1025, 2.0, True, "16"):
        with pytest.raises(ValueError, match=r"vllm_recent_tokens'\] must be an integer in \[0, 1024\]"):
            settings.parse({"sparkkv": {"vllm_recent_tokens": bad}})
    assert settings.parse({"sparkkv": {"vllm_recent_tokens": 0}}).recent_tokens == 0
    assert settings.parse({}).recent_tokens == 16
    assert settings.parse({"sparkkv": {"vllm_prefix_caching": True}}).recent_tokens == 0  # keyed by first page
    assert settings.parse({}).config == sparkkv.SparKConfig()
