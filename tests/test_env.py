"""lsa_env: settings read from the environment, with clear errors for bad values."""
import sys

import pytest

import lsa_env


def test_the_gil_switch_knob_reads_milliseconds_and_rejects_the_rest(monkeypatch):
    monkeypatch.delenv("LSA_GIL_SWITCH_MS", raising=False)
    assert lsa_env.gil_switch_s() == pytest.approx(lsa_env.GIL_SWITCH_MS / 1e3)  # unset: the worker's default
    monkeypatch.setenv("LSA_GIL_SWITCH_MS", " 5 ")  # Python's own
    assert lsa_env.gil_switch_s() == pytest.approx(0.005)
    for bad in ("fast", "0", "-1", "500", "nan"):
        monkeypatch.setenv("LSA_GIL_SWITCH_MS", bad)
        with pytest.raises(ValueError, match="LSA_GIL_SWITCH_MS"):
            lsa_env.gil_switch_s()
    assert sys.getswitchinterval() == pytest.approx(0.005)  # reading it changes nothing


def test_the_fused_decode_switch_reads_0_or_1_and_rejects_the_rest(monkeypatch):
    monkeypatch.delenv("LSA_FUSED_DECODE", raising=False)
    assert lsa_env.fused_decode() is (lsa_env.FUSED_DECODE == "1")
    for value, want in (("1", True), (" 0 ", False)):
        monkeypatch.setenv("LSA_FUSED_DECODE", value)
        assert lsa_env.fused_decode() is want
    for bad in ("yes", "2", "on"):
        monkeypatch.setenv("LSA_FUSED_DECODE", bad)
        with pytest.raises(ValueError, match="LSA_FUSED_DECODE"):
            lsa_env.fused_decode()


def test_the_decode_gemv_switch_reads_0_or_1_and_rejects_the_rest(monkeypatch):
    monkeypatch.delenv("LSA_DECODE_GEMV", raising=False)
    assert lsa_env.decode_gemv() is (lsa_env.DECODE_GEMV == "1")
    for value, want in (("1", True), (" 0 ", False)):
        monkeypatch.setenv("LSA_DECODE_GEMV", value)
        assert lsa_env.decode_gemv() is want
    for bad in ("yes", "2", "on"):
        monkeypatch.setenv("LSA_DECODE_GEMV", bad)
        with pytest.raises(ValueError, match="LSA_DECODE_GEMV"):
            lsa_env.decode_gemv()
