"""Unit-test hooks: lines a test wants in the CI log (pytest shows captured output only on
failure), written by the terminal reporter at the end of the session."""

from __future__ import annotations

import pytest

SUMMARY = pytest.StashKey[list[str]]()


@pytest.fixture
def ci_summary(request: pytest.FixtureRequest) -> list[str]:
    """Append a line here and it is printed in the session's summary, pass or fail."""
    return request.config.stash.setdefault(SUMMARY, [])


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("summary lines")
        for line in lines:
            terminalreporter.write_line(line)
