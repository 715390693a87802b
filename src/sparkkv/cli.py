"""`sparkkv` command line: `sparkkv demo`, `sparkkv bench`, `sparkkv eval`."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("sparkkv.demo", "offline demo: bytes and accuracy of SparK vs dense"),
    "bench": ("sparkkv.bench", "side-by-side benchmarks: bytes, decode timing, error vs dense per method"),
    "eval": ("sparkkv.accuracy", "accuracy of each method on the offline testbed tasks, with bytes"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:8s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: sparkkv <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return
    import importlib

    importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    main()
