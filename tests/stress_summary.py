"""Per-case failure counts of a `make test-stress` run, from its JUnit XML (one line per case, worst first).

python tests/stress_summary.py stress.xml
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict


def main(path: str) -> int:
    runs: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # case -> [runs, failures, skipped]
    worst: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        key = re.sub(r"(?<=\[)seed\d+-|-?seed\d+(?=\])|-seed\d+(?=-)", "", name).replace("[]", "")
        stats = runs[key]
        stats[0] += 1
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            stats[1] += 1
            worst.setdefault(key, (failure.get("message") or "").splitlines()[0][:160])
        elif case.find("skipped") is not None:
            stats[2] += 1
    failed = 0
    print(f"{'failures':>8} {'runs':>5}  case")
    for key, (n, f, sk) in sorted(runs.items(), key=lambda kv: (-kv[1][1], kv[0])):
        if sk == n:
            continue
        failed += f
        print(f"{f:>8} {n:>5}  {key}" + (f"\n{'':>15}first: {worst[key]}" if f else ""))
    cases = sum(1 for n, _, sk in runs.values() if sk < n)
    print(f"\n{cases} cases, {sum(n for n, _, _ in runs.values())} runs, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
