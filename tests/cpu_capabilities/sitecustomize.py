"""Put on PYTHONPATH by tests/conftest.py, so that every Python process a test starts (the training script under
`accelerate launch` or torchrun, the benchmark scripts) sees the same CPU capabilities as the test process itself.

HF_R1EWC_TEST_NATIVE_BF16=0 makes torch report no native bf16 (no AVX512-BF16, no AMX) whatever the CPU has; =1 makes
it report native bf16 (bf16 then runs emulated on CPUs without it: slow, but every branch stays reachable). The suite
runs with 0 unless a test asks for 1, so that it passes or fails alike on every CPU CI may get.
"""

import os


def _force_native_bf16(native: bool) -> None:
    try:
        import torch
    except ImportError:  # a Python without torch (a tool's interpreter): nothing to force
        return
    torch.cpu._is_avx512_bf16_supported = lambda: native
    torch.cpu._is_amx_tile_supported = lambda: native


if os.environ.get("HF_R1EWC_TEST_NATIVE_BF16") in ("0", "1"):
    _force_native_bf16(os.environ["HF_R1EWC_TEST_NATIVE_BF16"] == "1")
