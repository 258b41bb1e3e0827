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


@pytest.mark.parametrize("name,read,default", [("LSA_FUSED_DECODE", lsa_env.fused_decode, lsa_env.FUSED_DECODE),
                                                   ("LSA_DECODE_GEMV", lsa_env.decode_gemv, lsa_env.DECODE_GEMV),
                                                   ("LSA_PDL", lsa_env.pdl, lsa_env.PDL)])
def test_the_decode_switches_read_0_or_1_and_reject_the_rest(monkeypatch, name, read, default):
    monkeypatch.delenv(name, raising=False)
    assert read() is (default == "1")
    for value, want in (("1", True), (" 0 ", False)):
        monkeypatch.setenv(name, value)
        assert read() is want
    for bad in ("yes", "2", "on"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            read()


def test_pdl_is_never_used_off_cuda(monkeypatch):
    """LSA_PDL=1 changes nothing on the CPU (Triton's interpreter has no PDL)."""
    import torch

    from kernels.pdl import enabled
    monkeypatch.setenv("LSA_PDL", "1")
    assert not enabled(torch.zeros(2))
