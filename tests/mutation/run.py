"""`make mutate`: mutation testing of the code that holds byod's guarantees, in suites.

    .venv/bin/python tests/mutation/run.py [SUITE...]      # all suites by default
    .venv/bin/python tests/mutation/run.py --report-only   # the last results again
    .venv/bin/python tests/mutation/run.py --survivors     # only the last run's survivors
                                                           # again (after new tests)

Each suite is a set of modules (or of functions in one) and the tests that pin them: mutmut
runs each mutant against the tests of its suite that cover the mutated function. Suites
keep a module's mutants off tests that only pass through it (the ledger is called by every
runner test; running those for each ledger mutant costs hours and proves nothing more).
A suite runs in ``build/mutation/<suite>/`` with its own ``[tool.mutmut]``.

The report counts, per module, the mutants killed, the equivalent ones (listed with a
reason in tests/mutation/equivalent.txt: ``mutant name  # why it cannot change
behaviour``) and the survivors; it exits 1 when a survivor is not listed or the score is
under 90 %.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "mutation"
EQUIVALENT = Path(__file__).with_name("equivalent.txt")
TARGET = 0.90


@dataclass(frozen=True)
class Suite:
    """Modules to mutate (``only`` limits them to some functions) and the tests that pin them."""

    modules: tuple[str, ...]
    tests: tuple[str, ...]
    only: tuple[str, ...] = ()


#: the runner's chain: the lease held, the stamp read and reconciled, the steps in order,
#: a failure and what it skips, the code of the version reached. (How one step runs, its
#: phases and backfill batches, is ``byod.runner.step`` and ``byod.phased``: their own
#: tests are the backfill and Convex suites, not mutated here; nor is the trail a refusal
#: leaves, ``byod.runner.trail``, pinned by the refusal tests of every suite.)
CHAIN = (
    "byod.runner.core.xǁRunnerǁ_run_leased__mutmut_*",
    "byod.runner.reconcile.x_read_stamp__mutmut_*",
    "byod.runner.reconcile.x_restamp_stale__mutmut_*",
    "byod.runner.reconcile.x_reconcile__mutmut_*",
    "byod.runner.chain.xǁChainǁ*",
)

SUITES = {
    "registry": Suite(
        ("src/byod/registry.py",), ("tests/test_registry.py", "tests/test_checksums.py")
    ),
    "crypto": Suite(("src/byod/crypto.py",), ("tests/test_crypto.py",)),
    "instance_url": Suite(
        ("src/byod/instance_url.py",),
        ("tests/test_instance_url.py", "tests/test_instance_network.py"),
    ),
    "ledger": Suite(("src/byod/controlplane/ledger.py",), ("tests/test_ledger.py",)),
    "halt": Suite(
        ("src/byod/fleet/halt.py",),
        (
            "tests/test_fleet.py::test_the_halt_policy_rules",
            "tests/test_fleet.py::test_a_canary_wave_that_passes_lets_the_rest_run_after_it",
            "tests/test_fleet.py::test_canary_failure_halts_before_touching_the_rest",
            "tests/test_fleet.py::test_failure_ratio_halts_the_rest_and_leaves_nothing_half_done",
        ),
    ),
    "chain": Suite(
        ("src/byod/runner/core.py", "src/byod/runner/reconcile.py", "src/byod/runner/chain.py"),
        # the chain is the same whatever the databases (their dialects are the targets'
        # own): SQLite for both sides, a quarter of the time per mutant
        (
            "tests/test_runner.py",
            # the chain's paths that need a backfill, a gate or an Alembic history
            "tests/test_backfill.py::test_a_rollback_below_a_step_in_progress_is_refused",
            "tests/test_gates.py::test_a_gate_holds_every_user_until_all_are_through_and_it_is_opened",
            "tests/test_alembic_history.py::test_a_mixed_fleet_is_adopted_and_migrated_to_head_in_one_run",
            "-k",
            "not cp_pg and not inst_pg and not postgres and not mariadb",
        ),
        only=CHAIN,
    ),
}

# what a log line or a metric says is not a guarantee the chain holds (the log and
# monitoring tests check those): their statements are left as written
_NOT_MUTATED = [r"^\s*log\.(info|warning|error|debug)\(", r"^\s*metrics\.", r"extra=step_fields\("]


def _toml_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join("'" + item + "'" for item in items) + "]"


def prepare(name: str, suite: Suite) -> Path:
    """The suite's folder: the project's sources and tests, its own ``[tool.mutmut]``."""
    folder = BUILD / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for part in ("src", "tests"):
        (folder / part).symlink_to(ROOT / part)
    project = (ROOT / "pyproject.toml").read_text()
    project = re.sub(r"(?ms)^\[tool\.mutmut\].*?(?=^\[|\Z)", "", project)
    project += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {_toml_list(suite.modules)}\n"
        f"do_not_mutate_patterns = {_toml_list(_NOT_MUTATED)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(suite.tests)}\n"
    )
    (folder / "pyproject.toml").write_text(project)
    return folder


def mutmut() -> str:
    return str(Path(sys.executable).with_name("mutmut"))


def run(name: str, suite: Suite, *, survivors: bool = False) -> None:
    """Mutate the suite's modules afresh; ``survivors``: run only the mutants that
    survived the last run again, against the tests as they are now."""
    if survivors:
        folder = BUILD / name
        names = [m for m, status in results(name, suite) if status == "survived"]
        if not names:
            return
    else:
        folder, names = prepare(name, suite), list(suite.only)
    started = time.monotonic()
    print(f"== {name}: mutating {', '.join(suite.modules)}", flush=True)
    done = subprocess.run(
        [mutmut(), "run", *names],
        cwd=folder,
        env=os.environ | {"TERM": "dumb"},
        stdout=subprocess.DEVNULL,
        check=False,
    )
    print(f"== {name}: {time.monotonic() - started:.0f}s (mutmut exit {done.returncode})")


def results(name: str, suite: Suite) -> list[tuple[str, str]]:
    """(mutant, status) of the suite's last run: its mutants only."""
    folder = BUILD / name
    if not (folder / "mutants").is_dir():
        return []
    done = subprocess.run(
        [mutmut(), "results", "--all", "true"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    found = []
    for line in done.stdout.splitlines():
        mutant, _, status = line.strip().rpartition(": ")
        if mutant and (not suite.only or any(fnmatchcase(mutant, p) for p in suite.only)):
            found.append((mutant, status))
    return found


def equivalents() -> dict[str, str]:
    """Mutant name -> why it is equivalent."""
    found = {}
    for line in EQUIVALENT.read_text().splitlines():
        name, _, why = line.partition("#")
        if name.strip():
            found[name.strip()] = why.strip()
    return found


def report(names: list[str]) -> int:
    listed = equivalents()
    per_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unexplained = []
    for name in names:
        for mutant, found in results(name, SUITES[name]):
            status = "equivalent" if found == "survived" and mutant in listed else found
            if status not in ("killed", "timeout", "equivalent"):
                unexplained.append(f"{mutant}: {status}")
            per_module[mutant.rsplit(".", 1)[0]][status] += 1
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
    return 0 if total_counted and score >= TARGET and not unexplained else 1


def main(argv: list[str]) -> int:
    report_only, survivors = "--report-only" in argv, "--survivors" in argv
    names = [a for a in argv if not a.startswith("--")] or list(SUITES)
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite {', '.join(unknown)}; the suites: {', '.join(SUITES)}")
        return 2
    if not report_only:
        for name in names:
            run(name, SUITES[name], survivors=survivors)
    return report(names)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
