"""The kernel dispatcher: Triton where it applies, the reference for shapes Triton does not take."""
import torch

import kernels
from kernels import dispatch, reference


def test_auto_runs_the_reference_off_cuda_and_for_tiny_shapes(monkeypatch):
    monkeypatch.setenv("LSA_KERNELS", "auto")
    cpu = torch.zeros(1)
    assert dispatch.pick(cpu, "sparse_attention", "sparse_decode_attention", 64, 16) is \
        reference.sparse_decode_attention
    monkeypatch.setattr(dispatch, "use_triton", lambda t: True)  # as if on CUDA
    assert dispatch.pick(cpu, "kv_write", "paged_kv_write", 8) is reference.paged_kv_write  # head dim 8
    assert dispatch.pick(cpu, "sparse_attention", "sparse_decode_attention", 64, 8) is \
        reference.sparse_decode_attention  # 8-token blocks
    assert dispatch.pick(cpu, "kv_write", "paged_kv_write", 64).__name__ == "paged_kv_write_triton"


def test_forced_triton_is_not_second_guessed(monkeypatch):
    monkeypatch.setenv("LSA_KERNELS", "triton")
    assert dispatch.pick(torch.zeros(1), "kv_write", "paged_kv_write", 8).__name__ == "paged_kv_write_triton"


def test_supported_shapes():
    assert dispatch.triton_supports(64, 16) and dispatch.triton_supports(128, 128)
    assert not dispatch.triton_supports(96) and not dispatch.triton_supports(8)
    assert not dispatch.triton_supports(64, 8) and not dispatch.triton_supports(64, 256)
    assert callable(kernels.paged_kv_write)
