import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import DATA, write_tiny_clipseg, write_tiny_hf_clip  # noqa: E402

@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    os.environ["VLSEG_CACHE"] = str(tmp_path_factory.mktemp("vlseg-cache"))


# Tests run in pytest-xdist workers (pyproject's addopts): the cores are shared among them, at most 2 threads each.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def clipseg_dir(tmp_path_factory):
    return write_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


@pytest.fixture(scope="session")
def hf_clip_dir(tmp_path_factory):
    return write_tiny_hf_clip(tmp_path_factory.mktemp("hfclip"))


@pytest.fixture()
def tiny():
    import vlseg

    return vlseg.create_model("tiny-test", pretrained=False)


@pytest.fixture(scope="session")
def shared_data():
    if not DATA.is_dir():
        pytest.skip(f"real data folder {DATA} is absent (../shared/data next to the checkout)")
    return DATA
