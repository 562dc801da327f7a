import os

import pytest
import torch

# Two cores: keep torch's pool at the machine size and never oversubscribe with other work.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed_and_offline(monkeypatch, tmp_path):
    torch.manual_seed(0)
    # No test may download: the cache is a fresh empty folder and hubs are offline.
    monkeypatch.setenv("CONVNEXT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
