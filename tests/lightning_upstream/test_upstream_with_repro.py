"""Adding ``ReproCallback`` must not change any ``ModelCheckpoint`` behaviour.

Lightning's own checkpoint tests (vendored in ``tests_pytorch/``; README.md beside this) run in a
subprocess three times: without ReproCallback (the baseline), then with
``ReproCallback(checkpoint_format="torch")`` and ``...="safetensors"`` added to every Trainer
(``REPRO_UPSTREAM_CALLBACK``, see ``tests_pytorch/conftest.py``). Each mode must pass exactly
the tests the baseline passes; the safetensors mode less the tests that open a checkpoint file
themselves (``SAFETENSORS_EXCLUDED``), which it skips.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest
from upstream_lists import BASELINE_XFAIL, KNOWN_FAILURES, SAFETENSORS_EXCLUDED

HERE = Path(__file__).resolve().parent
VENDORED = HERE / "tests_pytorch"
MODES = ("torch", "safetensors")
# The whole vendored set takes ~30 s a mode on 2 cores; this only stops a hung run.
RUN_TIMEOUT_S = 900

pytestmark = pytest.mark.slow

Outcomes = dict[str, str]


def _outcome(case: ET.Element) -> str:
    for child in case:
        if child.tag in ("failure", "error"):
            return "failed"
        if child.tag == "skipped":
            return "xfailed" if child.get("type") == "pytest.xfail" else "skipped"
    return "passed"


def _run(mode: str, workdir: Path) -> tuple[Outcomes, str]:
    """Run every vendored test in ``mode``; the outcome of each (by node id) and the output."""
    cwd = workdir / "cwd"  # an empty working directory: nothing may be left in it
    cwd.mkdir()
    report = workdir / "report.xml"
    env = {**os.environ, "REPRO_UPSTREAM_CALLBACK": mode}
    env.pop("PYTEST_ADDOPTS", None)
    command = [sys.executable, "-m", "pytest", str(VENDORED), "-p", "no:cacheprovider", "-q",
               "-rfEX", f"--junitxml={report}", f"--basetemp={workdir / 'basetemp'}"]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, check=False)
    output = done.stdout[-20000:] + done.stderr[-5000:]
    assert report.is_file(), f"{mode}: no report (pytest exit {done.returncode})\n{output}"
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = _outcome(case)
    left = sorted(p.name for p in cwd.iterdir())
    assert not left, f"REPRO_UPSTREAM_CALLBACK={mode} left {left} in the working directory"
    return outcomes, output


def _key_of(nodeid: str) -> str:
    """``tests.lightning_upstream.tests_pytorch.a.test_b::test_c[x]`` -> ``a/test_b.py::test_c``."""
    module, name = nodeid.split("::", 1)
    relative = module.split(".tests_pytorch.", 1)[1].replace(".", "/") + ".py"
    return f"{relative}::{name.split('[', 1)[0]}"


def _with(outcomes: Outcomes, outcome: str) -> set[str]:
    return {nodeid for nodeid, got in outcomes.items() if got == outcome}


def _summary(output: str) -> str:
    """pytest's short test summary (the reasons), else the output's end."""
    marker = "short test summary info"
    return output[output.index(marker):] if marker in output else output[-6000:]


def _explain(mode: str, problems: dict[str, set[str]], output: str) -> str:
    lines = [f"REPRO_UPSTREAM_CALLBACK={mode}:"]
    for what, nodeids in problems.items():
        if nodeids:
            lines.append(f"  {what} ({len(nodeids)}):")
            lines.extend(f"    {nodeid}" for nodeid in sorted(nodeids))
    return "\n".join([*lines, _summary(output)])


@pytest.fixture(scope="module")
def run_mode(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Outcomes, str]]:
    cache: dict[str, tuple[Outcomes, str]] = {}

    def run(mode: str) -> tuple[Outcomes, str]:
        if mode not in cache:
            cache[mode] = _run(mode, tmp_path_factory.mktemp(f"upstream-{mode}"))
        return cache[mode]

    return run


def test_baseline_is_clean(run_mode: Callable[[str], tuple[Outcomes, str]]) -> None:
    """Without ReproCallback every vendored test passes or skips, except the listed baseline
    failures, which fail (xfail, strict) for their listed reason; both lists name real tests."""
    outcomes, output = run_mode("none")
    failed = _with(outcomes, "failed")
    assert not failed, _explain("none", {"failed": failed}, output)
    assert len(_with(outcomes, "passed")) > 100, output
    keys = {_key_of(nodeid) for nodeid in outcomes}
    assert set(BASELINE_XFAIL) <= keys, set(BASELINE_XFAIL) - keys
    assert set(SAFETENSORS_EXCLUDED) <= keys, set(SAFETENSORS_EXCLUDED) - keys
    xfailed = {_key_of(nodeid) for nodeid in _with(outcomes, "xfailed")}
    assert xfailed == set(BASELINE_XFAIL), output


@pytest.mark.parametrize("mode", MODES)
def test_repro_callback_keeps_upstream_results(
    mode: str, run_mode: Callable[[str], tuple[Outcomes, str]]
) -> None:
    baseline, _ = run_mode("none")
    outcomes, output = run_mode(mode)
    expected_passed = _with(baseline, "passed")
    if mode == "safetensors":
        expected_passed = {n for n in expected_passed if _key_of(n) not in SAFETENSORS_EXCLUDED}
    known = KNOWN_FAILURES[mode]
    may_pass = set(expected_passed)  # a known failure's other parametrizations may pass
    expected_passed = {n for n in expected_passed if _key_of(n) not in known}
    failed = _with(outcomes, "failed")
    problems = {
        "failed": {n for n in failed if _key_of(n) not in known},
        "listed in KNOWN_FAILURES but did not fail": set(known) - {_key_of(n) for n in failed},
        "passed at baseline, not here": expected_passed - _with(outcomes, "passed"),
        "passed here, not at baseline": _with(outcomes, "passed") - may_pass,
        "collected at baseline, not here": set(baseline) - set(outcomes),
        "collected here, not at baseline": set(outcomes) - set(baseline),
    }
    assert not any(problems.values()), _explain(mode, problems, output)
