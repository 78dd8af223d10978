import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tiny weights and class-token banks go to a per-session folder, never to the user's cache."""
    os.environ["IEDP_CACHE"] = str(tmp_path_factory.mktemp("iedp_cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield
