"""Every setting lsa-serve reads from the environment, in one place (prefix ``LSA_``).

Values are read when asked for, never at import time, so tests can set them per case.
"""
import os


def kernel_backend() -> str:
    """``LSA_KERNELS``: ``auto`` (Triton on CUDA tensors, torch reference elsewhere),
    ``triton`` (always Triton; on CPU tensors this needs ``TRITON_INTERPRET=1``) or ``torch``."""
    value = os.environ.get("LSA_KERNELS", "auto").strip().lower()
    if value not in ("auto", "triton", "torch"):
        raise ValueError(f"LSA_KERNELS must be auto, triton or torch, got {value!r}")
    return value


def model_dir() -> str | None:
    """``LSA_MODEL_DIR``: extra directory searched for model names given to ``--model``."""
    return os.environ.get("LSA_MODEL_DIR") or None


def haystack_dir() -> str | None:
    """``LSA_HAYSTACK``: directory of long text files for evaluation (default: ../shared/data/haystack)."""
    return os.environ.get("LSA_HAYSTACK") or None


def cache_dir() -> str:
    """``LSA_CACHE_DIR``: what is derived once from a model file and kept (a GGUF's converted
    tokenizer; default ``~/.cache/lsa-serve``)."""
    return os.environ.get("LSA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lsa-serve")


def kv_dir() -> str:
    """``LSA_KV_DIR``: where KV stores create their shared-memory block arenas (default
    ``/dev/shm``, else the temp directory)."""
    value = os.environ.get("LSA_KV_DIR")
    if value:
        return value
    return "/dev/shm" if os.path.isdir("/dev/shm") else __import__("tempfile").gettempdir()


FUSED_DECODE = "0"  # measured slower on the H200 (docs/perf.md, eighth session): off


def fused_decode() -> bool:
    """``LSA_FUSED_DECODE``: ``1`` runs a decode batch's projections with the layer's norms, SiLU
    and residual adds fused in (``kernels.decode_linear``, where the Triton kernels run: CUDA);
    ``0`` keeps cuBLAS and the separate kernels. Default: ``FUSED_DECODE``."""
    return _switch("LSA_FUSED_DECODE", FUSED_DECODE)


def _switch(name: str, default: str) -> bool:
    """An on/off variable: ``1`` or ``0`` (spaces ignored), ``default`` when unset."""
    value = os.environ.get(name, default).strip()
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


DECODE_GEMV = "1"  # faster on the H200: 128K b1 LSA 4.95 vs 5.09 ms/token (docs/perf.md, eleventh session)


def decode_gemv() -> bool:
    """``LSA_DECODE_GEMV``: ``1`` runs a small decode batch's projections (q|k|v with the rotary of
    q and k inside, o, gate|up with the SwiGLU inside, down, the LM head) through the plain Triton
    GEMV where its measured tiles beat cuBLAS (``kernels.decode_gemv``; CUDA only); ``0`` keeps
    cuBLAS and the separate rotary and SiLU kernels. Default: ``DECODE_GEMV``."""
    return _switch("LSA_DECODE_GEMV", DECODE_GEMV)


PDL = "1"  # faster on the H200: 128K b1 LSA 4.84 vs 4.90 ms/token, 512K 5.97 vs 6.03 (docs/perf.md, twelfth session)


def pdl() -> bool:
    """``LSA_PDL``: ``1`` launches the decode step's Triton kernels (projections, norms, KV write,
    sparse attention) with programmatic dependent launch where the GPU has it (Hopper and later):
    a kernel's programs may start while the previous kernel finishes and wait inside
    (``gdc_wait``) before they touch memory. Default: ``PDL``."""
    return _switch("LSA_PDL", PDL)


GIL_SWITCH_MS = 0.5  # a decode worker's default (Python's own: 5 ms)


def gil_switch_s() -> float:
    """``LSA_GIL_SWITCH_MS``: the GIL switch interval of a decode worker's process, in ms (default
    0.5; Python's own is 5): how long a thread that wants the GIL (the decode loop, back from
    waiting for the device) may wait while another thread runs Python (the replica's event loop
    streaming tokens, Ray's callbacks). Measured on the H200 (docs/perf.md, 2026-12-02 seventh
    session): 4 x 128K served sessions' steady ITL p99 1.25x the median at 0.5 ms against 1.34x
    at Python's 5 ms, the same tokens/s."""
    value = os.environ.get("LSA_GIL_SWITCH_MS", "").strip()
    if not value:
        return GIL_SWITCH_MS / 1e3
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not 0.01 <= ms <= 100:
        raise ValueError(f"LSA_GIL_SWITCH_MS must be a number of milliseconds in 0.01..100, got {value!r}")
    return ms / 1e3
