"""Test-wide settings: offline hubs and wandb, deterministic CPU threads."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "STEPDISTILL_CACHE" not in os.environ:  # never write into the user's cache from tests
    import tempfile

    os.environ["STEPDISTILL_CACHE"] = tempfile.mkdtemp(prefix="stepdistill-test-cache-")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (restored after): tiny models run much faster single-threaded,
    and are not slowed down ~100x when the 2-core machine is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
