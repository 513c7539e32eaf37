"""Where a benchmark's JSON goes: --out, or benchmarks/results/<name>_<device>.json."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_results(results: dict, name: str, device: str, out: str | None = None) -> Path:
    """`results` as indented JSON at `out`, or at results/<name>_<device>.json with the device's
    spaces as underscores; says where."""
    path = Path(out or RESULTS / f"{name}_{device.replace(' ', '_')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return path
