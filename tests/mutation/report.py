"""The score of `make mutate`: mutmut's results, less the mutants listed as equivalent.

    .venv/bin/python tests/mutation/report.py [PATTERN...]

Counts the mutants whose names match a pattern (``fnmatch``, as ``mutmut run`` takes them;
every mutant without one). Prints, per module, the mutants killed, the equivalent ones
(listed with a reason in tests/mutation/equivalent.txt: ``mutant name  # why it cannot
change behaviour``) and the survivors; exits 1 when a survivor is not listed or the score
is under 90 %.
"""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from fnmatch import fnmatchcase
from pathlib import Path

EQUIVALENT = Path(__file__).with_name("equivalent.txt")
TARGET = 0.90


def equivalents() -> dict[str, str]:
    """Mutant name -> why it is equivalent."""
    found = {}
    for line in EQUIVALENT.read_text().splitlines():
        name, _, why = line.partition("#")
        if name.strip():
            found[name.strip()] = why.strip()
    return found


def main(patterns: list[str]) -> int:
    mutmut = str(Path(sys.executable).with_name("mutmut"))
    done = subprocess.run(
        [mutmut, "results", "--all", "true"], capture_output=True, text=True, check=True
    )
    listed = equivalents()
    per_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unexplained = []
    for line in done.stdout.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name or (patterns and not any(fnmatchcase(name, p) for p in patterns)):
            continue
        module = name.rsplit(".", 1)[0]
        if status == "survived" and name in listed:
            status = "equivalent"
        elif status not in ("killed", "timeout"):
            unexplained.append(f"{name}: {status}")
        per_module[module][status] += 1
    total_killed = total_counted = 0
    for module, counts in sorted(per_module.items()):
        killed = counts["killed"] + counts["timeout"]
        counted = sum(n for status, n in counts.items() if status != "equivalent")
        total_killed, total_counted = total_killed + killed, total_counted + counted
        score = killed / counted if counted else 1.0
        print(
            f"{module:32s} {killed:4d} killed of {counted:4d} ({score:6.1%}); "
            f"{counts['equivalent']} equivalent, listed"
        )
    score = total_killed / total_counted if total_counted else 1.0
    print(f"{'all':32s} {total_killed:4d} killed of {total_counted:4d} ({score:6.1%})")
    for line in unexplained:
        print(f"not killed, not listed as equivalent: {line}")
    return 0 if score >= TARGET and not unexplained else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
