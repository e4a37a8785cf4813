import os
import sys

import pytest

# The references live beside the tests; make them importable as a plain module.
sys.path.insert(0, os.path.dirname(__file__))


#: Counts the robustness tests (kill, fuzz, hostile files) report; printed at the end of the
#: run, so CI's log shows them even though pytest captures a passing test's output.
_ROBUSTNESS_COUNTS: list[str] = []


@pytest.fixture
def report_counts():
    """``report_counts(line)``: print ``line`` now and in the run's summary."""

    def report(line: str) -> None:
        print(line)
        _ROBUSTNESS_COUNTS.append(line.strip())

    return report


def pytest_terminal_summary(terminalreporter):
    if _ROBUSTNESS_COUNTS:
        terminalreporter.section("robustness counts")
        for line in _ROBUSTNESS_COUNTS:
            terminalreporter.write_line(line)
