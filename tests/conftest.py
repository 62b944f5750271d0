import os
import sys

import torch

# Triton kernels must see the interpreter flag before they are defined, so set it before any
# pbs_kernels import; on a CUDA machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Test files in sub-folders import the shared helpers in tests/_ref.py.
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tp_llama(tmp_path_factory):
    """The tiny Llama of the tensor-parallel tests (tests/_tp.py), saved once per session."""
    pytest.importorskip("accelerate", reason="transformers' tp_plan needs accelerate (the dev extra installs it)")
    from _tp import save_tp_llama

    return save_tp_llama(tmp_path_factory.mktemp("tp") / "llama")
