"""Shared fixtures: tiny models come from tests/tiny_models.py, the brute-force reference from
tests/reference.py."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models, reference, extra_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def collect():
    """``hf_fisher.collect`` (a clear setup error while the engine does not exist)."""
    import hf_fisher

    return hf_fisher.collect


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny forward passes: they gain nothing from threads
    and slow down a lot on a busy machine (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
