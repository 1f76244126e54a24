import shutil

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cxx: needs a C++ compiler (torch.compile on CPU builds C++)")


def pytest_collection_modifyitems(config, items):
    if any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return
    skip = pytest.mark.skip(reason="no C++ compiler here: torch.compile on CPU needs one")
    for item in items:
        if "requires_cxx" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
