import os
import tempfile

# Libraries read their cache locations and offline flags when first imported (datasets, huggingface_hub): point them
# away from the user's home and the network before any test module imports them.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="selfy-tests-hf-home-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# The native extraction kernel is compiled on first use: into a directory of the test run, not the user's cache.
os.environ["SELFY_HF_KERNEL_CACHE"] = tempfile.mkdtemp(prefix="selfy-tests-kernels-")

import matplotlib  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

matplotlib.use("Agg")

# pytest-xdist runs one worker per core: keep each worker single-threaded so they don't oversubscribe the CPU.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Subprocesses started by tests keep Hugging Face caches (remote-code modules, hub files) out of the user's
    home and never reach for the network."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
