"""Two device helpers for timings and reports (no kd imports: anything may use them)."""

from __future__ import annotations

import resource

import torch


def synchronize(device: torch.device) -> None:
    """Wait until the device has run everything queued on it (CUDA); elsewhere nothing is queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS on the CPU.

    On Linux the peak RSS is VmHWM: getrusage's ru_maxrss survives exec, so a run started
    from a large process (a benchmark holding torch) would report at least that process's size.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "cpu_peak_rss"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


def reset_peak_memory(device: torch.device) -> None:
    """Start `peak_memory`'s count afresh (the CUDA allocator's; the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def use_fast_kernels(device: torch.device) -> None:
    """On a GPU: cuDNN picks the fastest convolution for the (fixed) input shapes, and float32
    matrix products and convolutions use TF32 tensor cores (bf16/fp16 runs are unaffected)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
