"""
Setup every script shares: the device and its precision, the peak FLOP/s an
MFU is measured against, and memory.
"""

import contextlib

import torch

from configurator import fail

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Datasheet dense (no sparsity) BF16 tensor-core peaks, TFLOP/s, matched by substring of the device name.
PEAK_TFLOPS = [
    ("H200 NVL", 835.0),  # NVIDIA H200 NVL datasheet: BF16 1,671 TF with sparsity -> 835 dense
    ("H200", 989.0),  # NVIDIA H200 datasheet: BF16 1,979 TF with sparsity -> 989 dense (SXM)
    ("H100 NVL", 835.0),  # NVIDIA H100 datasheet, NVL column: 1,671 TF with sparsity
    ("H100 PCIe", 756.0),  # NVIDIA H100 datasheet, PCIe column: 1,513 TF with sparsity
    ("H100", 989.0),  # NVIDIA H100 datasheet, SXM column: 1,979 TF with sparsity
    ("A100", 312.0),  # NVIDIA A100 datasheet: BF16 312 TF dense
    ("B200", 2250.0),  # NVIDIA HGX B200 datasheet: FP16/BF16 4.5 PF per GPU with sparsity -> 2,250 dense
    ("L40S", 362.0),  # NVIDIA L40S datasheet: BF16 362.05 TF dense (733 with sparsity)
    ("L40", 181.0),  # NVIDIA L40 datasheet: BF16 181.05 TF dense (362.1 with sparsity); before "L4"
    ("L4", 121.0),  # NVIDIA L4 datasheet: BF16 242 TF with sparsity -> 121 dense
    ("A10G", 70.0),  # AWS/NVIDIA A10G: 70 TF dense BF16 (sparse 140)
    ("A10", 125.0),  # NVIDIA A10 datasheet: BF16 125 TF dense (250 with sparsity); after "A100" and "A10G"
    ("RTX 4090", 165.2),  # Ada whitepaper: BF16 with FP32 accumulate 165.2 TF dense
    ("RTX 3090", 71.0),  # Ampere GA102 whitepaper: BF16 with FP32 accumulate 71 TF dense
]


# -----------------------------------------------------------------------------
# device and precision


def resolve_device(name, local_rank=0):
    """A torch.device from a config value: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps.
    A bare "cuda" is the process's own GPU under torchrun. A device this PyTorch cannot see is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{local_rank}")
        return torch.device("mps") if torch.backends.mps.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        fail(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    missing = {"cuda": not torch.cuda.is_available(), "mps": not torch.backends.mps.is_available()}
    if missing.get(dev.type):
        fail(f"device={name!r}, but this PyTorch sees no such device: use device=cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def resolve_dtype(name, dev):
    """The compute dtype from a config value: auto is bfloat16 on GPUs that have it, float16 on other GPUs,
    float32 elsewhere."""
    if name == "auto":
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        fail(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def autocast(dev, dtype):
    """Mixed precision for the forward pass; nothing in float32."""
    return torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def dtype_name(dtype):
    return str(dtype).split(".")[-1]


def peak_tflops(device_name):
    """The dense BF16 peak of a GPU by name, or None when it is not in PEAK_TFLOPS."""
    for key, tf in PEAK_TFLOPS:
        if key in device_name:
            return tf
    return None


def memory_mb(dev):
    """Peak memory: allocated on the GPU, or the process's maximum resident set on a CPU."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:
        return float("nan")
