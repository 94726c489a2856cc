"""A pytest plugin: a skipped test fails the run, unless it is a GPU-only check on a machine without CUDA.

A host test that skips for want of the host, the browser or an oracle hides exactly the breakage
it exists to catch, so the run lists such skips and exits 1. A GPU-only check skips with a reason
that starts with :data:`GPU_ONLY`. Loaded by ``conftest.py``.
"""
from __future__ import annotations

GPU_ONLY = "GPU-only"


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


class NoSkips:
    """Collects the skips of one run and fails the run when there are any."""

    def __init__(self):
        self.skipped: list[str] = []

    def pytest_runtest_logreport(self, report):
        if report.skipped and not hasattr(report, "wasxfail") and not skip_reason(report).startswith(GPU_ONLY):
            self.skipped.append(f"{report.nodeid}: {skip_reason(report)}")

    def pytest_terminal_summary(self, terminalreporter):
        if self.skipped:
            terminalreporter.section("skipped tests fail the run (only GPU-only checks may skip)", red=True)
            for line in self.skipped:
                terminalreporter.write_line(line)

    def pytest_sessionfinish(self, session, exitstatus):
        if self.skipped and exitstatus == 0:
            session.exitstatus = 1


def pytest_configure(config):
    config.pluginmanager.register(NoSkips(), "negative-guidance-no-skips")
