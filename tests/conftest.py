"""Shared fixtures. Every test runs on one CPU thread: the suite has to stay fast on a 2-core machine
that is busy with other work."""
import pytest
import torch

import model as M

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    # sft.main / grpo.main set the thread count from their config; put it back after every test.
    yield
    torch.set_num_threads(1)


@pytest.fixture
def tiny():
    """A fresh built-in tiny model (random weights, seed 0) and its tokenizer."""
    return M.load("tiny", seed=0)


@pytest.fixture(scope="session")
def tok():
    return M.build_char_tokenizer()
