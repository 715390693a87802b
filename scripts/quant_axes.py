"""Which quantization axis for which stored kind, measured on the real model (docs/quantization.md).

Runs small grids (needle at one length, n samples; WikiText-2 perplexity) on SmolLM2-135M for:
  plain quantization of dense keys: per channel over groups of tokens (sparkkv's choice, KIVI's)
      against per token over groups of channels (quanto's QuantizedCache axis for keys);
  SparK's kept key values: symmetric codes (sparkkv's choice, no zero stored) against asymmetric.
Each variant is run with its own output folder (the variants are not SparKConfig fields, so a
patch of the key packer selects them); every configuration shares the grid's prefills.

    python scripts/quant_axes.py --out runs/quant_axes --haystack ../shared/data/text/paul_graham_essays.json \
        --text ../shared/data/text/wikitext2_test.txt --n 20 --length 2048 --threads 1
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

import sparkkv
from sparkkv import SparKConfig, policies
from sparkkv.eval import report
from sparkkv.eval.experiment import GridSpec, run_grid
from sparkkv.eval.records import Store
from sparkkv.eval.tasks import TaskInputs
from sparkkv.quant import QuantizedTensor

PLAIN = [SparKConfig(method="none", key_bits=b, value_bits=b) for b in (4, 2)]
STACKED = [SparKConfig(key_prune_ratio=0.8, key_bits=b, mask_format="trits") for b in (4, 2)]


def _per_token_keys(self, keys, first_token, token_mask=None, like=None):
    return QuantizedTensor.quantize(keys, self.config.key_bits, self.config.quant_group_size, "row")


def _asymmetric_kept_keys(original):
    def pack(self, keys, first_token, token_mask=None, like=None):
        config = self.config
        packed = original(self, keys, first_token, token_mask, like)
        if config.key_bits < 16:  # re-quantize the kept values with a zero per group
            vals = packed.vals.dense(torch.float32).to(packed.dtype)
            packed = type(packed)(**{**packed.__dict__, "vals": QuantizedTensor.quantize(vals, config.key_bits,
                                                                                       config.quant_group_size, "row")})
        return packed
    return pack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--haystack", type=Path, required=True)
    p.add_argument("--text", type=Path, required=True)
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=10)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    model, tokenizer = sparkkv.models.load("smollm2-135m")
    inputs = TaskInputs(haystack=args.haystack, text=args.text, ppl_tokens=32)
    variants = {
        "sparkkv (keys per channel, kept keys symmetric)": ({}, [None] + PLAIN + STACKED),
        "keys per token": ({(policies.QuantizedKeys, "pack"): _per_token_keys}, PLAIN),
        "kept keys asymmetric": ({(policies.SparKKeys, "pack"): _asymmetric_kept_keys(policies.SparKKeys.pack)}, STACKED),
    }
    rows = []
    for name, (patches, configs) in variants.items():
        saved = {key: getattr(*key) for key in patches}
        try:
            for (cls, attr), fn in patches.items():
                setattr(cls, attr, fn)
            for task, length in (("niah_single_2", args.length), ("perplexity", 1024)):
                spec = GridSpec(model="smollm2-135m", tasks=[task], lengths=[length], n=args.n if task != "perplexity" else 10,
                                configs=configs, batch_size=args.batch_size, max_new_tokens=12, inputs=inputs)
                folder = args.out / name.split(" (")[0].replace(" ", "_")
                with Store(folder) as store:
                    records = run_grid(spec, model, tokenizer, store)
                rows += [{**r, "variant": name} for r in records]
        finally:
            for (cls, attr), fn in saved.items():
                setattr(cls, attr, fn)
    print(report.pivot(rows) if hasattr(report, "pivot") else rows)
    for r in rows:
        print(f"{r['variant']:<50} {r['method']:<28} {r['task']:<14} {r['score']:.4f} {r['kv_vs_dense']:.3f}")


if __name__ == "__main__":
    main()
