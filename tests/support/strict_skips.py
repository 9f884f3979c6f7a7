"""A skip is a failure when GGUFLOOP_STRICT_SKIPS=1 (`make test`, so CI): there every extra, the packaged
models, the data and lm-eval are installed, so a skip means something the suite needs went missing and the
run must not look green (review T4: a missing extra once skipped whole files quietly). The skips this
machine explains by itself are listed in EXPECTED; tests/conftest.py loads these hooks."""

from __future__ import annotations

import os

import pytest

EXPECTED = ("root writes through file permissions",)  # tests/test_robustness.py, when the suite runs as root


def _strict() -> bool:
    return os.environ.get("GGUFLOOP_STRICT_SKIPS") == "1"


def _reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def _fail_if_unexpected(report) -> None:
    if _strict() and report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report)
        if not any(expected in reason for expected in EXPECTED):
            report.outcome = "failed"
            report.longrepr = f"unexpected skip (GGUFLOOP_STRICT_SKIPS=1): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_if_unexpected(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_if_unexpected(outcome.get_result())
