"""Timing, memory and out-of-memory handling, kept apart from what is being timed.

Timing method: warm-up calls first (the first call on CUDA autotunes mamba-ssm's Triton kernels and picks cuDNN
algorithms; neither may be timed), then `repeats` calls each timed on its own (CUDA events around the call on
GPU, perf_counter on CPU), reported as the median.  Peak memory is read over the timed calls only, after a reset,
so it is the steady state and not the autotuner's scratch buffers.
"""
from __future__ import annotations

import gc
import importlib.metadata
import platform
import statistics
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import torch

GIB = 2 ** 30


# -- out of memory ------------------------------------------------------------------------------------------------


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # CPU allocations and some CUDA paths (cuBLAS workspaces, Triton launches) report OOM as a RuntimeError
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_unless_oom(thunk: Callable[[], Any]) -> tuple[Any, str | None]:
    """(thunk(), None), or (None, the error's first line) when it ran out of memory; other errors propagate."""
    try:
        return thunk(), None
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if not is_out_of_memory(exc):
            raise
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    # freed only here, outside the except block: until then the traceback's frames still hold the activations
    free_memory()
    return None, message


# -- timing -------------------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_one_call(call: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call takes: device time between two CUDA events, or host wall time on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


@dataclass
class Timing:
    seconds: list[float]
    peak_mem_bytes: int | None  # None on CPU: torch does not track host allocations
    warmup_s: float = 0.0  # untimed: where autotuning and compilation show up

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)


def measure(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
            seconds_per_point: float | None = None, min_repeats: int = 3) -> Timing:
    """Warm up, then time `repeats` calls. With `seconds_per_point`, slow calls get fewer repeats (at least
    `min_repeats`), so the large resolutions do not dominate the run's wall time."""
    started = time.perf_counter()
    for _ in range(max(warmup, 1)):  # at least one untimed call: it may compile or autotune
        last_warmup_s = time_one_call(call, device)
    warmup_s = time.perf_counter() - started
    if seconds_per_point is not None:
        repeats = max(min(repeats, min_repeats), min(repeats, int(seconds_per_point / max(last_warmup_s, 1e-9))))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [time_one_call(call, device) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return Timing(seconds, peak, warmup_s)


def interleaved_best(calls: list[tuple[Callable[[], Any], Callable[[], Any]]], device: torch.device, rounds: int,
                     repeats: int = 8) -> list[float]:
    """Median seconds per call of each (context, call) pair, timed in `rounds` interleaved rounds, the best round
    kept: clock or thermal drift hits every call alike. Each call runs inside `context()` (a variant's settings);
    the first round warms up twice (compilation, autotuning), later ones once."""
    best = [float("inf")] * len(calls)
    for rnd in range(rounds):
        for i, (context, call) in enumerate(calls):
            with context():
                best[i] = min(best[i], measure(call, device, warmup=2 if rnd == 0 else 1, repeats=repeats).median_s)
    return best


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms, in float64): how far a result is from its reference."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cuda_event_ms(call: Callable[[], Any], repeats: int = 20, rounds: int = 5) -> float:
    """Median over `rounds` of the mean ms of `repeats` back-to-back calls between two CUDA events (one call per
    event pair would time the launch too), after three untimed calls."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeats)
    return sorted(times)[rounds // 2]


def _profile_one_call(call: Callable[[], Any]):
    """torch.profiler's record of the CUDA kernels of one call of `call`, after one untimed call."""
    from torch.profiler import ProfilerActivity, profile
    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    return prof


def cuda_kernel_table(call: Callable[[], Any], row_limit: int = 16) -> str:
    """The top CUDA kernels of one call of `call` (after one untimed call), as torch.profiler's table."""
    return _profile_one_call(call).key_averages().table(sort_by="cuda_time_total", row_limit=row_limit,
                                                         max_name_column_width=60)


def cuda_kernel_ms(call: Callable[[], Any]) -> float:
    """GPU time (ms) of the CUDA kernels one call of `call` launches (after one untimed call): set beside the call's
    own time, it says whether the call waits on the host."""
    return sum(e.self_device_time_total for e in _profile_one_call(call).key_averages()) / 1e3


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """The device's dense matmul rate in this dtype, measured: median TFLOP/s of an n x n x n GEMM (the yardstick
    for the encoders' achieved TFLOP/s)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * n ** 3 / timing.median_s / 1e12


# -- environment --------------------------------------------------------------------------------------------------


def package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "timm": package_version("timm"),
        "mamba_ssm": package_version("mamba-ssm", "mamba_ssm"),
    }
