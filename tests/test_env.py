"""lsa_env: settings read from the environment, with clear errors for bad values."""
import sys

import pytest

import lsa_env


def test_the_gil_switch_knob_reads_milliseconds_and_rejects_the_rest(monkeypatch):
    monkeypatch.delenv("LSA_GIL_SWITCH_MS", raising=False)
    assert lsa_env.gil_switch_s() is None  # unset: Python's own interval stays
    monkeypatch.setenv("LSA_GIL_SWITCH_MS", " 0.5 ")
    assert lsa_env.gil_switch_s() == pytest.approx(0.0005)
    for bad in ("fast", "0", "-1", "500", "nan"):
        monkeypatch.setenv("LSA_GIL_SWITCH_MS", bad)
        with pytest.raises(ValueError, match="LSA_GIL_SWITCH_MS"):
            lsa_env.gil_switch_s()
    assert sys.getswitchinterval() == pytest.approx(0.005)  # reading it changes nothing
