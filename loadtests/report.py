"""What every benchmark ends with: the table of its checks against their targets, and a JSON
report of the run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

Check = tuple[str, float, str, bool]  # (what, value, target, met)


def finish(out: Path, checks: list[Check], **report: Any) -> int:
    """Print the checks, write `report` with them to `out`; the exit status (1: a miss)."""
    width = max(len(c[0]) for c in checks)
    print(f"{'check':{width}} {'value':>7}  target   ok")
    for name, value, target, ok in checks:
        print(f"{name:{width}} {value:7.3f}  {target:7}  {'PASS' if ok else 'FAIL'}")
    body = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **report}
    body["checks"] = [{"check": c[0], "value": c[1], "target": c[2], "ok": c[3]} for c in checks]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(body, indent=2))
    print(f"\nwrote {out}")
    return 0 if all(c[3] for c in checks) else 1
