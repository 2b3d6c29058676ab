import pytest

from exporters.timing import TimingProtocol, time_callable


@pytest.fixture
def timed():
    """A no-op timed with 3 warm-up and 20 timed runs: (latency, number of calls)."""
    calls = []
    latency = time_callable(lambda: calls.append(1), TimingProtocol(warmup=3, runs=20))
    return latency, len(calls)


def test_time_callable_runs(timed):
    assert timed[0].runs == 20


def test_time_callable_call_count(timed):
    # The cold run counts as the first warm-up run.
    assert timed[1] == 3 + 20


def test_time_callable_p50_below_p90(timed):
    assert timed[0].p50 <= timed[0].p90


def test_time_callable_positive(timed):
    assert timed[0].p50 > 0


def test_protocol_to_dict_unpinned():
    assert TimingProtocol().to_dict()["affinity"] == "unpinned"
