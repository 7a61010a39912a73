"""Fast by default: probe what the hardware computes natively and turn the config's ``auto`` values into the
settings that are fastest there.

Two places decide:

- the driver, before any worker starts, picks the worker layout (``scaling.*: auto``) from the cluster's nodes
  (``resolve_layout``): one worker per GPU on GPU nodes; on CPU-only nodes one worker per node holding all of
  its CPUs (DDP between processes of one machine splits the same cores and adds the gradient all-reduce);
- every worker resolves precision, memory format and compile for the device it got (``resolve_settings``,
  its ``WorkerSettings``), since the driver may run on another machine than the workers.

The rules are data, not guesses: each says which measurement it rests on.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    import torch

    from metaformer_platform.config import ScalingSettings, TrainerConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
Precision = Literal["fp32", "bf16"]

# The CPU flags that matter for bf16 (Linux /proc/cpuinfo names).
AMX_BF16 = "amx_bf16"
AVX512_BF16 = "avx512_bf16"
_BF16_FLAGS = (AMX_BF16, AVX512_BF16)

# CUDA: bf16 tensor cores from Ampere (compute capability 8.0) on.
CUDA_BF16_CAPABILITY = (8, 0)

# torch.compile pays only when the run is long enough to win back its first compile. CPU: that compile takes
# 100-200 s on 2 cores (measured, DESIGN.md); at 0.2-0.5 s per eager step, 20000 steps keep it under ~5% of the
# run even if compiled steps were no faster. CUDA: a policy bound (about a minute of compile against steps of
# tens of ms), not a measurement of this project; override with trainer.compile=true/false.
COMPILE_MIN_STEPS = {"cuda": 2000, "cpu": 20000}


@dataclass(frozen=True)
class Capabilities:
    """What the device a worker trains on computes natively."""

    device_type: str  # "cuda" or "cpu"
    device_name: str
    cpus: int  # CPUs this process may run on
    cpu_flags: frozenset[str] = frozenset()  # the bf16-relevant ones present (amx_bf16, avx512_bf16)
    cuda_capability: tuple[int, int] | None = None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The bf16-relevant flags of this machine's CPUs (empty where /proc/cpuinfo is absent, e.g. macOS)."""
    try:
        words = set(cpuinfo.read_text().split())
    except OSError:
        return frozenset()
    return frozenset(flag for flag in _BF16_FLAGS if flag in words)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and Ray narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def probe(device: torch.device) -> Capabilities:
    """The capabilities of ``device`` (a ``torch.device``) as seen from this process."""
    import torch

    cpus = available_cpus()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Capabilities(
            device_type="cuda",
            device_name=torch.cuda.get_device_name(index),
            cpus=cpus,
            cuda_capability=tuple(torch.cuda.get_device_capability(index)),  # type: ignore[arg-type]
        )
    flags = cpu_flags()
    return Capabilities(device_type="cpu", device_name=_cpu_model(), cpus=cpus, cpu_flags=flags)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def bf16_fast(caps: Capabilities) -> tuple[bool, str]:
    """Whether bf16 autocast trains at least as fast as fp32 on this device, and why.

    CUDA: tensor cores compute bf16 from compute capability 8.0. CPU: a bf16 unit, AMX (``amx_bf16``) or
    AVX512-BF16 (``avx512_bf16``). Measured, poolformer_s12 training steps, AdamW, medians of alternating
    rounds (tests/benchmarks/bench_defaults.py --precision-only prints them):

    - AMX (DESIGN.md): bf16 + channels_last 1.58x faster than fp32 (64 px, batch 64, 2 threads);
    - AVX512-BF16 without AMX (this project's 2-core AMD EPYC, shared, load 24-57): 1 thread, 32 px, batch 32:
      bf16 took 0.81x the time of fp32 (NCHW and channels_last alike, 7 rounds); 2 threads, 32 px, batch 64,
      order shuffled per round: bf16 + channels_last 0.59-0.79x the time of the bare fp32 step: not slower;
    - no bf16 unit (AVX-512 only, issue 14): bf16 is emulated, 19.8 against 36.4 images/s for fp32 (1.84x slower).
    """
    if caps.device_type == "cuda":
        cap = caps.cuda_capability or (0, 0)
        if cap >= CUDA_BF16_CAPABILITY:
            return True, f"CUDA compute capability {cap[0]}.{cap[1]} has bf16 tensor cores"
        return False, f"CUDA compute capability {cap[0]}.{cap[1]} < 8.0 has no bf16 tensor cores"
    if AMX_BF16 in caps.cpu_flags:
        return True, "the CPU has AMX (amx_bf16)"
    if AVX512_BF16 in caps.cpu_flags:
        return True, "the CPU has avx512_bf16 (no AMX): bf16 training steps measured no slower than fp32"
    return False, "the CPU has no bf16 unit (no amx_bf16, no avx512_bf16): bf16 would be emulated, 1.84x slower"


@dataclass
class WorkerSettings:
    """What only a worker can resolve, from the device it got: the settings it trains with, and why each was
    chosen (printed and logged)."""

    precision: Precision
    channels_last: bool
    compile: bool
    torch_threads: int
    device: str
    reasons: dict[str, str] = field(default_factory=dict)
    fused_optimizer: bool | None = None  # known once the strategy has built the optimizer

    def params(self) -> dict[str, Any]:
        """As MLflow params (``resolved.*``: the config keeps what the user asked, e.g. ``auto``)."""
        values = {k: v for k, v in asdict(self).items() if k != "reasons"}
        return {f"resolved.{k}": v for k, v in values.items()}

    def summary(self) -> str:
        """One line per setting with its reason, for the start of a job's log."""
        lines = [f"settings for {self.device}:"]
        for key in ("precision", "channels_last", "compile", "torch_threads", "fused_optimizer"):
            if getattr(self, key) is None:
                continue
            why = self.reasons.get(key, "set in the config")
            lines.append(f"  {key} = {getattr(self, key)}  ({why})")
        return "\n".join(lines)


def resolve_numerics(trainer: TrainerConfig, caps: Capabilities) -> tuple[Precision, bool, dict[str, str]]:
    """``trainer.precision`` and ``trainer.channels_last`` for this device, ``auto`` made concrete, with the
    reasons: the part of ``resolve_settings`` that the data loaders need before the run length is known (they
    make their batches in the memory format the model trains in, so no batch is copied twice)."""
    reasons: dict[str, str] = {}
    precision: Precision
    if trainer.precision == "auto":
        fast, why = bf16_fast(caps)
        precision = "bf16" if fast else "fp32"
        reasons["precision"] = f"auto: {why}"
    else:
        precision = trainer.precision

    channels_last = trainer.channels_last
    if channels_last == "auto":
        # CUDA: NHWC convolutions are what the tensor cores run (cuDNN converts NCHW otherwise). CPU bf16: with AMX
        # channels_last + bf16 was the 1.58x setting (DESIGN.md), with AVX512-BF16 no slower than NCHW (see
        # bf16_fast). CPU fp32: no gain measured (0.83-1.15x of NCHW's time, noisy), so timm's default NCHW stays.
        channels_last = caps.device_type == "cuda" or precision == "bf16"
        reasons["channels_last"] = (
            "auto: NHWC for tensor cores" if caps.device_type == "cuda"
            else "auto: bf16 on CPU runs NHWC kernels" if channels_last
            else "auto: fp32 on CPU gained nothing measurable from NHWC"
        )
    return precision, bool(channels_last), reasons


def resolve_settings(trainer: TrainerConfig, caps: Capabilities, *, total_steps: int,
                     cpus_per_worker: float | Literal["auto"] | None = None) -> WorkerSettings:
    """``trainer.precision/channels_last/compile/torch_threads`` for this device, ``auto`` (or null threads)
    replaced by the fastest measured choice there. Threads: the plan sets them (one per CPU of the layout); a
    Trainer built without one (tests, benchmarks) takes ``cpus_per_worker``, else the CPUs it may run on."""
    precision, channels_last, reasons = resolve_numerics(trainer, caps)

    compile_ = trainer.compile
    if compile_ == "auto":
        need = COMPILE_MIN_STEPS.get(caps.device_type, COMPILE_MIN_STEPS["cpu"])
        compile_ = total_steps >= need
        reasons["compile"] = (
            f"auto: {total_steps} steps {'>=' if compile_ else '<'} {need}, the run length where the first "
            f"compile pays on {caps.device_type}"
        )

    threads = trainer.torch_threads
    if threads is None:
        threads = max(1, int(cpus_per_worker)) if isinstance(cpus_per_worker, int | float) else caps.cpus
        reasons["torch_threads"] = "one per CPU the worker holds"
    return WorkerSettings(
        precision=precision,
        channels_last=bool(channels_last),
        compile=bool(compile_),
        torch_threads=threads,
        device=f"{caps.device_type} ({caps.device_name}"
        + (f", flags {','.join(sorted(caps.cpu_flags)) or 'none'})" if caps.device_type == "cpu" else ")"),
        reasons=reasons,
    )


def resolved(value: T | Literal["auto"], name: str) -> T:
    """``value`` once ``auto`` has been made concrete (``resolve_layout``, by the job plan): the narrowing the code after those steps relies on, with a clear error where a caller skipped them."""
    if isinstance(value, str) and value == "auto":
        raise ValueError(
            f"{name}=auto has not been resolved yet: run the job through metaformer_platform.launch.driver (which resolves "
            f"it for the cluster), or set {name} to a concrete value"
        )
    return value


def _resolved_workers(scaling: ScalingSettings) -> int | tuple[int, int]:
    """``scaling.num_workers`` once resolved: a count, or an elastic job's (min, max) range. (Not ``resolved``:
    mypy joins int and tuple to object through its type variable.)"""
    value = scaling.num_workers
    if isinstance(value, str):
        return resolved(value, "scaling.num_workers")  # raises: "auto" is the only str value
    return value


def inductor_cache_dir(cache_dir: str) -> Path:
    """Where torch.compile keeps its compiled kernels: under the platform's cache folder, so a second run of
    the same model and shapes starts in seconds instead of minutes (TORCHINDUCTOR_CACHE_DIR wins when set)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path = Path(cache_dir).expanduser() / "inductor"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


# -- the worker layout (driver side) ---------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How many workers, with what, and why."""

    num_workers: int | tuple[int, int]  # a range: an elastic job
    cpus_per_worker: float
    use_gpu: bool
    reason: str

    @classmethod
    def of(cls, scaling: ScalingSettings) -> Layout:
        """The layout of a config whose ``scaling.*: auto`` the launcher has already resolved (``resolve_layout``):
        what the code after that step computes with. A ValueError names a field still ``auto``."""
        return cls(
            num_workers=_resolved_workers(scaling),
            cpus_per_worker=resolved(scaling.cpus_per_worker, "scaling.cpus_per_worker"),
            use_gpu=resolved(scaling.use_gpu, "scaling.use_gpu"),
            reason="read from the resolved config",
        )


def resolve_layout(scaling: ScalingSettings, nodes: list[dict[str, float]]) -> Layout:
    """``scaling.num_workers/cpus_per_worker/use_gpu`` for a cluster of ``nodes`` (each node's total resources,
    e.g. ``{"CPU": 16, "GPU": 2}``), ``auto`` replaced by the fastest layout there.

    GPUs: one worker per GPU, each with its share of its node's CPUs (for its loader processes). CPU only: one
    worker per node with all of its CPUs: on one 2-core machine, poolformer_s12 at 64 px, fp32, 1 worker x 2
    threads trained at 43.2 images/s against 36.4 for 2 workers x 1 thread with DDP over gloo (issue 14).
    """
    if not nodes:
        raise ValueError("the Ray cluster has no alive nodes: start one (ray start) or leave run.ray_address unset")
    gpus = [int(n.get("GPU", 0)) for n in nodes]
    use_gpu = scaling.use_gpu if scaling.use_gpu != "auto" else sum(gpus) > 0
    if use_gpu:
        gpu_nodes = [(n, g) for n, g in zip(nodes, gpus, strict=True) if g > 0]
        if not gpu_nodes:
            raise ValueError("scaling.use_gpu=true but the Ray cluster has no GPU: set scaling.use_gpu=auto or false")
        num = sum(g for _, g in gpu_nodes)
        cpus = min(n.get("CPU", 1.0) // g for n, g in gpu_nodes) or 1.0
        reason = f"one worker per GPU ({num} GPUs on {len(gpu_nodes)} nodes)"
    else:
        cpu_nodes = [n for n in nodes if n.get("CPU", 0) >= 1]
        num = len(cpu_nodes)
        cpus = min(n["CPU"] for n in cpu_nodes)
        reason = f"CPU only: one worker per node with all its CPUs ({num} nodes, {cpus:g} CPUs each at least)"
    explicit_workers = scaling.num_workers != "auto"
    explicit_cpus = scaling.cpus_per_worker != "auto"
    if explicit_workers and not explicit_cpus:
        # a given number of workers shares the cluster's CPUs (no fewer than 1 each; a worker fits on one node)
        total = sum(n.get("CPU", 0.0) for n in nodes)
        cpus = max(1.0, min(cpus, total // scaling.max_workers))
    if explicit_workers or explicit_cpus:
        reason = "set in the config" if explicit_workers and explicit_cpus else reason + " (partly set in the config)"
    return Layout(
        num_workers=_resolved_workers(scaling) if explicit_workers else int(num),
        cpus_per_worker=float(scaling.cpus_per_worker) if explicit_cpus else float(cpus),
        use_gpu=bool(use_gpu),
        reason=reason,
    )
