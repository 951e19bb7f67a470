"""Shared helpers of the tests/test_align_*.py files (no tests here).

`one_thread_fixture()` makes a module-scoped fixture that runs a module's tests with one torch
thread and restores the count after: the align tests use models of a few thousand to 0.3M
parameters, where one thread is as fast as two on an idle machine and 10-100x faster on a shared
one (two OpenMP threads wait on each other whenever another job holds a core)."""
import pytest
import torch


def one_thread_fixture(autouse: bool = True):
    @pytest.fixture(autouse=autouse, scope="module")
    def one_thread():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
    return one_thread
