import pytest

from boothkit.commands import threads


@pytest.mark.parametrize("cores,load,expected", [(2, 0.1, 2), (2, 0.9, 1), (2, 9.7, 1), (16, 3.2, 13), (4, 0.0, 4)])
def test_default_threads_are_the_free_cores(monkeypatch, cores, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
    n, why = threads.choose(None)
    assert n == expected and why == f"{cores} cores, load average {load:.1f}"


def test_threads_option_and_environment_win(monkeypatch):
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose(None) == (3, "OMP_NUM_THREADS")
    assert threads.choose(5) == (5, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert threads.choose(None)[1].endswith("load average 0.0")
