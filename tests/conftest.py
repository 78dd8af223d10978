import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tiny weights and class-token banks go to a per-session folder, never to the user's cache."""
    os.environ["IEDP_CACHE"] = str(tmp_path_factory.mktemp("iedp_cache"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(scope="session", autouse=True)
def _fp32_cpu_default():
    """Tests compare against fp32 numbers: the CPU's bf16 instructions (which make ``--dtype auto`` pick bf16) must
    not change them from one host to another. Session-wide, so that module fixtures (a served app, a loaded
    pipeline) are built under it too; tests of that choice patch the capabilities themselves."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    without_bf16 = {k: v for k, v in capabilities.items() if k not in ("avx512_bf16", "amx_bf16")}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cpu, "get_capabilities", lambda: without_bf16, raising=False)
        yield
