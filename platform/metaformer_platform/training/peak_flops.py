"""The peak FLOP/s of one training device, the denominator of model FLOPs utilisation (MFU), as torchtitan
reports it: model FLOPs per second over the device's dense peak at the precision the run trains in.

GPUs come from a table of vendor datasheet figures (dense: without 2:4 sparsity). A CPU's peak is derived from
its vector units: cores x clock x FLOPs per cycle per core (see ``cpu_peak``). Where no figure is known the
answer is None and MFU is left out, never guessed.
"""

from __future__ import annotations

from pathlib import Path

# (substrings that must all occur in torch.cuda.get_device_name(), {precision: dense peak FLOP/s}), most
# specific first ("H100 PCIe" before "H100", "A100" before "A10"). fp32 is the plain FP32 (non-tensor-core)
# figure: PyTorch leaves TF32 matmuls off by default.
GPU_PEAKS: tuple[tuple[tuple[str, ...], dict[str, float]], ...] = (
    # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100): H100 NVL BF16 835 TF, FP32 60 TF
    (("H100", "NVL"), {"bf16": 835e12, "fp32": 60e12}),
    # same datasheet, H100 PCIe: BF16 756 TF, FP32 51 TF
    (("H100", "PCIe"), {"bf16": 756e12, "fp32": 51e12}),
    # same datasheet, H100 SXM (device name "NVIDIA H100 80GB HBM3"): BF16 989 TF, FP32 67 TF
    (("H100",), {"bf16": 989e12, "fp32": 67e12}),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): H200 NVL BF16 835 TF, FP32 60 TF
    (("H200", "NVL"), {"bf16": 835e12, "fp32": 60e12}),
    # same datasheet, H200 SXM: BF16 989 TF, FP32 67 TF
    (("H200",), {"bf16": 989e12, "fp32": 67e12}),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100), SXM and PCIe: BF16 312 TF, FP32 19.5 TF
    (("A100",), {"bf16": 312e12, "fp32": 19.5e12}),
    # NVIDIA L40S datasheet (nvidia.com/en-us/data-center/l40s): BF16 362 TF, FP32 91.6 TF
    (("L40S",), {"bf16": 362e12, "fp32": 91.6e12}),
    # NVIDIA L4 datasheet (nvidia.com/en-us/data-center/l4): BF16 121 TF, FP32 30.3 TF
    (("L4",), {"bf16": 121e12, "fp32": 30.3e12}),
    # NVIDIA A10 datasheet (nvidia.com/en-us/data-center/products/a10-gpu): BF16 125 TF, FP32 31.2 TF
    (("A10",), {"bf16": 125e12, "fp32": 31.2e12}),
    # NVIDIA V100 datasheet (nvidia.com/en-us/data-center/v100), SXM2: FP32 15.7 TF; no bf16 unit
    (("V100",), {"fp32": 15.7e12}),
)

# fp32 FLOPs per cycle per core of the widest FMA unit the flags name, ASSUMING two FMA ports per core (Intel
# Xeon Scalable "Gold"/"Platinum", AMD Zen 5): AVX-512 2 x 16 lanes x 2 (multiply + add) = 64; AVX2/FMA 2 x 8 x 2 =
# 32. A CPU with one AVX-512 FMA port (some Xeon Silver/Bronze) or a 256-bit datapath (Zen 4) reaches half: its
# MFU reads low by 2x. bf16: AMX tiles 1024 FLOPs per cycle per core (Intel's Sapphire Rapids figure: 1024 BF16
# ops/cycle), AVX512-BF16 twice the fp32 rate (VDPBF16PS: pairs); without a bf16 unit bf16 is emulated at the
# fp32 rate.
FP32_PER_CYCLE = (("avx512f", 64.0), ("avx2", 32.0))
BF16_PER_CYCLE = (("amx_bf16", 1024.0), ("avx512_bf16", 128.0))


def gpu_peak(device_name: str, precision: str) -> float | None:
    """The dense peak FLOP/s of the GPU named ``device_name`` at ``precision`` (None: not in the table)."""
    for needles, peaks in GPU_PEAKS:
        if all(n in device_name for n in needles):
            return peaks.get(precision)
    return None


def cpu_flags_and_clock(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[frozenset[str], float | None]:
    """The vector-unit flags of this machine's CPUs and their clock in Hz (the highest ``cpu MHz`` listed:
    a VM's nominal clock, a host's current one), from /proc/cpuinfo; (empty, None) where it is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset(), None
    wanted = {flag for flag, _ in (*FP32_PER_CYCLE, *BF16_PER_CYCLE)}
    flags = frozenset(word for word in text.split() if word in wanted)
    clocks = [float(line.partition(":")[2]) for line in text.splitlines() if line.startswith("cpu MHz")]
    return flags, max(clocks) * 1e6 if clocks else None


def cpu_peak(cores: int, precision: str, flags: frozenset[str], clock_hz: float | None) -> float | None:
    """``cores`` x ``clock_hz`` x FLOPs per cycle of the vector unit ``flags`` name for ``precision`` (see
    ``FP32_PER_CYCLE``); None when the clock or a known unit is missing."""
    fp32 = next((per for flag, per in FP32_PER_CYCLE if flag in flags), None)
    per_cycle = fp32
    if precision == "bf16":
        per_cycle = next((per for flag, per in BF16_PER_CYCLE if flag in flags), fp32)
    if per_cycle is None or not clock_hz:
        return None
    return cores * clock_hz * per_cycle


def device_peak(device_type: str, device_name: str, precision: str, cores: int) -> float | None:
    """The peak FLOP/s of one worker's device: a GPU by name, else ``cores`` of this machine's CPU."""
    if device_type == "cuda":
        return gpu_peak(device_name, precision)
    return cpu_peak(cores, precision, *cpu_flags_and_clock())
