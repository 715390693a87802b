"""The accuracy-per-byte frontier of the README and docs/evaluation.md: one `sparkkv eval` run over an
explicit list of configurations (below), so that every configuration shares each batch's prefill.

`sparkkv eval` crosses every method with every quantization value; the frontier wants a chosen set
(plain quantization at a few bit pairs, SparK k0.8 with 8/4/2-bit kept keys and 16/4/2-bit values,
one value-pruning point, the QuantizedCache baselines) that no single cross gives without many
configurations nobody asked for, and each further `sparkkv eval` run would prefill the samples again.
Arguments are those of `sparkkv eval` except --methods / --ratios / --budgets / the quantization
axes, which this list replaces; the records, the CSV, the lock and `sparkkv report OUT` are the same.

    python scripts/frontier.py --model smollm2-135m --tasks niah_single_2 --lengths 2048 \
        --haystack PAUL_GRAHAM_ESSAYS_JSON --max-new-tokens 12 --batch-size 10 --n 50 --threads 1 --out OUT
    python scripts/frontier.py --model smollm2-135m --tasks perplexity --lengths 1024 --text WIKITEXT2_TEST \
        --ppl-tokens 32 --batch-size 10 --n 50 --threads 1 --out OUT
    sparkkv report OUT

`--only NAME [NAME ...]` keeps the listed configurations (their labels, e.g. "spark k0.8 kq4 vq4
trits"): the 4,096-token cells of docs/evaluation.md ran the eight that decide the front.
"""

from __future__ import annotations

import logging
import sys

from sparkkv import SparKConfig, cli
from sparkkv.eval import baselines


def frontier_configs() -> list:
    """Dense first, then the QuantizedCache baselines, plain quantization, SparK k0.8 stacked."""
    spark = dict(key_prune_ratio=0.8, mask_format="trits")
    return [
        None,
        SparKConfig(key_prune_ratio=0.8),
        *(baselines.parse(name) for name in ("quanto-int4", "quanto-int2", "hqq-int4", "hqq-int2")),
        *(SparKConfig(method="none", key_bits=k, value_bits=v) for k, v in ((8, 8), (4, 4), (4, 2), (2, 4), (2, 2))),
        # plain 4-bit with 32-wide groups: QuantizedCache 4-bit's bytes (7,200 B/token on SmolLM2 float32)
        SparKConfig(method="none", key_bits=4, value_bits=4, quant_group_size=32),
        *(SparKConfig(**spark, key_bits=k, value_bits=v) for k, v in ((8, 8), (4, 16), (16, 4), (4, 4), (4, 2), (2, 2))),
        SparKConfig(**spark, key_bits=4, value_bits=4, value_prune_ratio=0.5),
        SparKConfig(key_prune_ratio=0.5, mask_format="trits", key_bits=4, value_bits=4),
    ]


def _split_only(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`--only A B ...` (labels may hold spaces: one argument each) -> (the rest, the labels)."""
    if "--only" not in argv:
        return argv, None
    i = argv.index("--only")
    j = next((k for k in range(i + 1, len(argv)) if argv[k].startswith("--")), len(argv))
    return argv[:i] + argv[j:], argv[i + 1 : j]


def main(argv: list[str]) -> int:
    from sparkkv.eval import grid

    argv, only = _split_only(argv)
    try:
        configs = frontier_configs()
        if only is not None:
            labels = [grid.label(c) for c in configs]
            unknown = [name for name in only if name not in labels]
            if unknown or not only:
                raise cli.UsageError(f"frontier.py: error: argument --only: {unknown or 'nothing'} is not in the list; "
                                     f"expected some of {labels}")
            configs = [c for c, name in zip(configs, labels) if name in only]
        args = cli.parse(["eval", "--methods", "dense", *argv])
        args.configs = configs
        grid.check_fits(args.configs, args.lengths)
        cli.check_baselines(args.configs, "eval")
    except cli.UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except ValueError as exc:  # check_fits: a configuration that does not fit the lengths
        print(f"frontier.py: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cli.cmd_eval(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
