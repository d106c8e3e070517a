"""Where the benchmark scripts write their records: one JSON line per run, by default into results/benchmarks/
(not tracked by git). `--record benchmarks/results.jsonl` adds the run to the repository's record of measured
figures, which the README quotes."""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "records.jsonl"


def add_argument(ap) -> None:
    ap.add_argument("--record", type=Path, default=DEFAULT,
                    help=f"JSON-lines file the record is appended to (default: {DEFAULT}; the repository's record "
                         "of measured figures is benchmarks/results.jsonl)")


def append(record: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"record appended to {path}")
