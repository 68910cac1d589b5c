"""`pipeline.benchmarks.wait_until_quiet`: the gate the extract benchmarks pass before timing a
baseline."""

from __future__ import annotations

import sys

import pytest

from pipeline.benchmarks import wait_until_quiet


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_returns_after_one_window_when_the_bar_is_always_met_and_gives_up_at_max():
    # any machine is busy less than 101 %: one window, then done
    assert wait_until_quiet(busy_below=1.01, window_s=0.05, max_s=5.0) < 1.0
    # no machine is busy less than 0 %: it waits out max_s, not longer
    waited = wait_until_quiet(busy_below=0.0, window_s=0.05, max_s=0.3)
    assert 0.3 <= waited < 1.5
