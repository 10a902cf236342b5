"""Run the Megatron-LM integration tests against each Megatron release; print the table.

    python tools/release_matrix.py --repo /path/to/Megatron-LM.git \\
        --releases 0.14.0 0.16.1 0.17.1 0.18.2 0.19.0 main --workdir /tmp/matrix \\
        --output benchmarks/results/release_matrix.json

For each release: a Megatron-LM checkout at tag ``core_v<release>`` (``main``: the
branch), a fresh virtualenv with this interpreter holding the same torch as this one,
``numpy`` and ``packaging>=24.2`` first, then ``megatron-core==<release>`` from the
package registry (``main``: built from the checkout), all with ``--ignore-requires-python``
(0.17+ declare Python >= 3.12); Muon's ``emerging-optimizers`` as the README says; this
project (a regular install: it places the hook); and, on Python < 3.12, a one-line
``.pth`` giving ``typing`` a no-op ``override`` (Megatron-LM 0.18+ imports it). Then
``pytest tests/test_megatron_lm_integration.py`` with ``MEGATRON_LM_PATH`` set, and each
column of the table read from its tests' outcomes (JUnit XML).

Runs are resumable: a release whose ``result.json`` exists in ``--workdir`` is reused
(``--rerun`` tests again, in the environments already built; delete a release's folder to
rebuild it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from paci_megatron.versions import TESTED_RELEASES as RELEASES  # noqa: E402
SHIM = "import typing; typing.override = getattr(typing, 'override', lambda f: f)\n"

#: table column -> test names (prefixes) of tests/test_megatron_lm_integration.py
COLUMNS = {
    "glue contract": ("test_every_name_the_glue_rebinds",),
    "paci trains": ("test_paci_trains_megatron_lm_with_drift_per_stage",),
    "drift = bound": ("test_accumulation_one_gives_drift_bound_per_stage",),
    "drained == 1F1B": ("test_drained_paci_prints_1f1b_losses",),
    "no-flag unchanged": ("test_without_the_flag_and_with_1f1b_megatron_is_unchanged",),
    "save/resume": ("test_paci_checkpoint_saves_drained_and_resumes",),
    "MoE": ("test_moe_drained_paci_prints_1f1b_losses",),
    "TensorBoard": ("test_tensorboard_event_file_holds_the_drift_per_stage",),
    "uneven split": ("test_uneven_split_drained_paci_prints_1f1b_losses",),
    "batch-size ramp": ("test_batch_size_ramp_drained_paci_prints_1f1b_losses",),
    "step batch-size schedule": ("test_step_batch_size_schedule_drained_paci_prints_1f1b",),
    "overlap param gather": ("test_overlap_param_gather_drained_paci_prints_1f1b_losses",),
    "per-token loss": ("test_per_token_loss_drained_paci_prints_1f1b_losses",),
}


def run(cmd: Sequence[str], log, cwd: Optional[str] = None, env=None, timeout=3600) -> int:
    """Run ``cmd``, its output appended to the open file ``log``; the exit status."""
    log.write(f"\n$ {' '.join(map(str, cmd))}\n")
    log.flush()
    try:
        return subprocess.run(list(map(str, cmd)), cwd=cwd, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        log.write(f"timed out after {timeout} s\n")
        return 124


def checkout(repo: str, release: str, dest: str, log) -> bool:
    """Megatron-LM at ``core_v<release>`` (or ``main``) in ``dest``."""
    ref = "main" if release == "main" else f"core_v{release}"
    if not os.path.isdir(os.path.join(dest, ".git")):
        if run(["git", "clone", "--quiet", "--shared" if os.path.isdir(repo) else "--quiet",
                repo, dest], log) != 0:
            return False
    return run(["git", "-C", dest, "checkout", "--quiet", "--force", ref], log) == 0


def build_venv(release: str, venv: str, megatron_lm: str, log) -> Optional[str]:
    """A virtualenv for ``release``; its python, or None if an install failed."""
    import torch

    py = os.path.join(venv, "bin", "python")
    done = os.path.join(venv, "installed-for-release-matrix")
    pip = [py, "-m", "pip", "install", "--quiet"]
    this_project = pip + ["--no-deps", "--force-reinstall", ROOT]  # the launches import it
    if os.path.exists(done):  # built by an earlier run (--rerun keeps the environment)
        return py if run(this_project, log) == 0 else None
    core = [megatron_lm] if release == "main" else [f"megatron-core=={release}"]
    steps = [
        [sys.executable, "-m", "venv", "--clear", venv],
        pip + [f"torch=={torch.__version__.split('+')[0]}", "numpy", "packaging>=24.2"],
        pip + ["--ignore-requires-python"] + core,
        # this project without its megatron-core pin (main is past it), then the packages
        # of its extras megatron-lm, test and muon (setup.py), and TensorBoard
        this_project,
        pip + ["six", "regex", "pyyaml", "pydantic", "psutil", "triton", "absl-py",
               "pytest", "pytest-timeout", "matplotlib", "tokenizers", "tensorboard"],
        pip + ["--no-deps", "--ignore-requires-python", "emerging-optimizers==0.3.0"],
    ]
    for step in steps:
        if run(step, log) != 0:
            return None
    if sys.version_info < (3, 12):
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "typing_override_shim.pth"), "w") as f:
            f.write(SHIM)
    open(done, "w").close()
    return py


def outcomes(junit: str) -> Dict[str, str]:
    """Test name -> ``passed`` / ``failed`` / ``skipped`` from a JUnit XML file."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        tags = {child.tag for child in case}
        result[case.get("name")] = ("failed" if tags & {"failure", "error"} else
                                    "skipped" if "skipped" in tags else "passed")
    return result


def cell(tests: Dict[str, str], prefixes: Sequence[str]) -> str:
    """``yes`` if every matching test passed, ``NO`` if one failed, ``-`` if none ran."""
    found = [v for name, v in tests.items() if name.startswith(prefixes)]
    if not found or all(v == "skipped" for v in found):
        return "-"
    return "NO" if "failed" in found else "yes"


def run_release(repo: str, release: str, workdir: str, timeout: int, all_tests: bool,
                only: Optional[str] = None, earlier: Optional[Dict[str, str]] = None
                ) -> Dict[str, object]:
    """Check out, install and test one release (the tests of :data:`COLUMNS`, or all of
    them, or the ``-k`` expression ``only``, whose outcomes then replace those in
    ``earlier``); the row of the table."""
    where = os.path.join(workdir, release)
    os.makedirs(where, exist_ok=True)
    start = time.time()
    row: Dict[str, object] = {"release": release, "log": os.path.join(where, "log.txt")}
    with open(row["log"], "a" if only else "w") as log:
        checkout_dir = os.path.join(where, "Megatron-LM")
        py = build_venv(release, os.path.join(where, "venv"), checkout_dir, log) if checkout(
            repo, release, checkout_dir, log) else None
        row["installs"] = "yes" if py else "NO"
        if py:
            junit = os.path.join(where, "junit.xml")
            env = dict(os.environ, MEGATRON_LM_PATH=checkout_dir, PYTHONWARNINGS="ignore")
            select = [] if all_tests else ["-k", only or " or ".join(
                p for prefixes in COLUMNS.values() for p in prefixes)]
            row["pytest_exit"] = run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "tests/test_megatron_lm_integration.py", *select,
                                      f"--junitxml={junit}"], log, cwd=ROOT, env=env,
                                     timeout=timeout)
            tests = dict(earlier or {}, **(outcomes(junit) if os.path.exists(junit) else {}))
            row["tests"] = tests
            row.update({column: cell(tests, prefixes) for column, prefixes in COLUMNS.items()})
            row["passed"] = f"{sum(v == 'passed' for v in tests.values())}/{len(tests)}"
            if only:
                row["pytest_exit"] = int(any(v == "failed" for v in tests.values()))
            row["megatron_core"] = subprocess.run(
                [py, "-c", "import megatron.core; print(megatron.core.__version__)"],
                capture_output=True, text=True).stdout.strip() or None
    row["seconds"] = round(time.time() - start)
    return row


def markdown(rows: List[Dict[str, object]]) -> str:
    """The table: one row per release."""
    head = ["release", "megatron-core", "installs", *COLUMNS, "integration tests passed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [r["release"], r.get("megatron_core") or "-", r["installs"],
                  *[r.get(c, "-") for c in COLUMNS], r.get("passed", "-")]
        lines.append("| " + " | ".join(map(str, values)) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default="https://github.com/NVIDIA/Megatron-LM.git",
                        help="Megatron-LM git repository (a local clone or mirror is faster)")
    parser.add_argument("--releases", nargs="+", default=list(RELEASES))
    parser.add_argument("--workdir", required=True, help="checkouts, venvs and logs go here")
    parser.add_argument("--output", default=None, help="JSON of the table")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds of tests per release")
    parser.add_argument("--rerun", action="store_true", help="ignore earlier results")
    parser.add_argument("--all-tests", action="store_true",
                        help="every integration test, not only those of the table's columns")
    parser.add_argument("--only", default=None,
                        help="with --rerun: test again only these (a pytest -k expression); "
                             "the other outcomes are kept")
    args = parser.parse_args(argv)
    rows = []
    for release in args.releases:
        saved = os.path.join(args.workdir, release, "result.json")
        earlier = None
        if os.path.exists(saved):
            with open(saved) as f:
                earlier = json.load(f)
            if not args.rerun:
                rows.append(earlier)
                continue
        print(f"> {release}: installing and testing (log: {os.path.join(args.workdir, release, 'log.txt')})",
              flush=True)
        row = run_release(args.repo, release, args.workdir, args.timeout, args.all_tests,
                          args.only, (earlier or {}).get("tests") if args.only else None)
        with open(saved, "w") as f:
            json.dump(row, f, indent=1)
        print(f"  {release}: installs {row['installs']}, tests passed {row.get('passed', '-')} "
              f"in {row['seconds']} s", flush=True)
        rows.append(row)
    table = markdown(rows)
    print(table)
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"python": sys.version.split()[0], "rows": rows, "markdown": table}, f,
                      indent=1)
    return 0 if all(r["installs"] == "yes" and r.get("pytest_exit") == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
