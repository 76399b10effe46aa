"""Shared fixtures: a tokenizer trained on the spot and tiny randomly initialised Llamas (tiny.py)."""
import pytest
import torch

from tiny import make_model, make_tokenizer

torch.set_num_threads(2)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast tier (`bash run.sh test fast`)")

@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return make_model(tokenizer)
