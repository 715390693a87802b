"""Measurement: tasks, metrics, the shared-prefill runner, records, reports, benchmarks, the demo.

    tasks       every task by name (RULER, LongBench, perplexity, testbed)  -> `Sample`s
    ruler       RULER's synthetic tasks at an exact token length
    longbench   LongBench v1 English tasks from local JSONL (or the Hub)
    metrics     RULER string matches, LongBench's official metrics
    grid        methods x ratios x budgets -> `SparKConfig`s; argument parsing of those values
    runner      one prefill per batch (`PrefillCapture`), forked into every configuration
    experiment  a resumable grid: `GridSpec`, `run_grid`
    records     the result files of an evaluation folder
    report      the table formatter, pivot table, plots
    compare     teacher-forced error against dense, perplexity of one sequence
    bench       `sparkkv bench bytes|methods`; bench_decode: `sparkkv bench decode`
    demo        `sparkkv demo`, a preset of the grid

Importing this package imports none of the optional dependencies (matplotlib, rouge-score,
rapidfuzz, tqdm); they load where used.
"""
