import os

import pytest
import torch

# Two cores: keep torch's pools at the machine size and never oversubscribe with other work (`make test` runs
# two pytest-xdist workers: one thread each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


@pytest.fixture(autouse=True)
def _seed_and_offline(monkeypatch, tmp_path):
    torch.manual_seed(0)
    # No test may download: the cache is a fresh empty folder and hubs are offline.
    monkeypatch.setenv("CONVNEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _gpu_skip(report) -> bool:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return any(word in reason for word in ("CUDA", "GPU"))


def pytest_sessionfinish(session, exitstatus):
    """A skipped test is a failure (a missing dependency hides a feature), unless it needs a GPU."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = [r for r in (reporter.stats.get("skipped", []) if reporter else []) if not _gpu_skip(r)]
    if skipped and exitstatus == 0:
        names = ", ".join(r.nodeid for r in skipped[:5])
        reporter.write_line(f"FAILED: {len(skipped)} test(s) skipped without needing a GPU: {names}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
