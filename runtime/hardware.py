"""Hardware profiles: what the planner's cost model needs to know about a machine, and how to measure it.

A :class:`HardwareProfile` is plain data: achievable matmul rate per dtype, device memory bandwidth
and capacity, GPUs per node, and the bandwidth and latency of the two kinds of links a collective
can cross (inside a node: NVLink; between nodes: the network). The planner turns a model's FLOPs
and bytes into seconds with it (``passes/cost_model.py``); nothing here knows about models.

Built-in profiles (:data:`BUILTIN`):

- ``h100`` / ``h200``: 8 GPUs per NVLink node, 400 Gb/s per GPU between nodes. Peak figures are
  NVIDIA's data-sheet numbers; the *achieved* rates the cost model uses were fitted to the
  measurements in ``benchmarks/RESULTS.md`` (4 × H200, eager autoshard, torch 2.11): see
  :data:`H200_SOURCES` for where each number comes from. H100 shares H200's compute and links and
  differs in memory (80 GB HBM3 at 3.35 TB/s vs 141 GB HBM3e at 4.8 TB/s): its achieved memory
  bandwidth is H200's fitted value scaled by 3.35/4.8.
- ``cpu``: Gloo ranks on one host, conservative defaults; run ``autoshard calibrate`` to measure yours.

``autoshard calibrate`` measures the machine at hand (:func:`measure_matmul`, :func:`measure_copy`,
:func:`allreduce_worker` under several processes) and stores a profile as JSON in
:func:`profile_dir` (or a path); :func:`get_profile` loads a built-in name, a stored name or a path.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

GiB = 2**30

#: dtype names the profiles know, and the torch dtypes they stand for
DTYPE_NAMES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class HardwareProfile:
    """One device kind and its links. Rates are *achieved* (what a training step gets), not peak.

    Bandwidths are in GB/s (1e9 bytes), latencies in microseconds, memory in bytes, matmul rates in
    TFLOP/s (1e12). ``intra_gbps``/``inter_gbps`` are per-GPU *bus* bandwidths as NCCL's tests
    report them: a ring all-reduce of ``n`` bytes over ``p`` ranks takes ``2(p-1)/p · n / bw``.
    """

    name: str
    matmul_tflops: dict[str, float]  # achieved dense matmul rate per compute dtype ("fp32", "tf32", "bf16", "fp16")
    memory_gbps: float  # achieved device-memory bandwidth of elementwise kernels
    memory_bytes: int  # device memory per GPU
    gpus_per_node: int
    intra_gbps: float  # bus bandwidth inside a node (NVLink)
    intra_latency_us: float  # per ring step inside a node
    inter_gbps: float  # bus bandwidth per GPU between nodes (the network)
    inter_latency_us: float  # per ring step between nodes
    peak_tflops: float = 989.0  # the MFU denominator (dense bf16 peak for GPUs)
    attention_efficiency: float = 0.6  # fused attention's rate as a fraction of the matmul rate
    host_memory_bytes: int = 256 * GiB  # CPU memory available per GPU (offload)
    host_memory_gbps: float = 25.0  # CPU memory bandwidth per GPU (an offloaded optimizer step)
    pcie_gbps: float = 25.0  # host <-> device copies per GPU
    op_overhead_us: float = 10.0  # host time per eager op (launch, dispatch): bounds small models
    collective_overhead_us: float = 0.0  # per synchronous collective call in the graph (launch, stream wait)
    step_overhead_s: float = 0.0  # fixed host time per optimizer step (flattening, syncs)
    overlap_efficiency: float = 0.5  # fraction of the backward that hides the data-parallel gradient reduction
    reserved_bytes: int = 2 * GiB  # memory the budget leaves to the framework (context, allocator slack)
    sources: dict[str, str] = field(default_factory=dict)  # where each number comes from

    # ------------------------------------------------------------------ queries
    def matmul_rate(self, precision: str) -> float:
        """Achieved matmul FLOP/s for a compute precision ("fp32" uses TF32 when the profile has it)."""
        key = precision
        if precision == "fp32" and "tf32" in self.matmul_tflops:
            key = "tf32"
        if key not in self.matmul_tflops:
            key = next(iter(self.matmul_tflops))
        return self.matmul_tflops[key] * 1e12

    def budget_bytes(self, memory_gib: float | None = None) -> int:
        """The per-GPU memory a plan may use: ``memory_gib`` if given, else memory minus the reserve."""
        if memory_gib is not None:
            return int(memory_gib * GiB)
        return int(self.memory_bytes - self.reserved_bytes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        if not isinstance(d, dict):
            raise ValueError("a hardware profile is a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"hardware profile has unknown keys {unknown}; known: {sorted(known)}")
        try:
            prof = cls(**d)
        except TypeError as e:
            raise ValueError(f"hardware profile is incomplete: {e}") from None
        bad = [k for k in ("memory_gbps", "memory_bytes", "gpus_per_node", "intra_gbps", "inter_gbps")
               if not (isinstance(getattr(prof, k), (int, float)) and getattr(prof, k) > 0)]
        if bad or not prof.matmul_tflops or any(v <= 0 for v in prof.matmul_tflops.values()):
            raise ValueError(f"hardware profile {prof.name!r}: {', '.join(bad) or 'matmul_tflops'} must be positive")
        return prof

    def save(self, path: str) -> str:
        """Write the profile as JSON (atomically: temp file + rename); returns the path."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        return path


# ====================================================================================== built-ins
#: Where each H200 number comes from. "fit" = chosen so the cost model reproduces RESULTS.md rows.
H200_SOURCES = {
    "peak_tflops": "NVIDIA H100/H200 SXM data sheet: 989 TFLOP/s dense bf16 (the MFU denominator in RESULTS.md)",
    "memory_bytes": "141 GB HBM3e; torch reports 139.8 GiB per GPU on the 4 x H200 machine",
    "matmul_tflops.bf16": "fit: 953M Llama-style, dp=4 ZeRO-1/2 bf16, 4 seq/GPU (RESULTS.md 2026-11-22b: "
                          "160.5 / 153.2 ms) together with the 6.7B ZeRO-2 row (553 ms)",
    "matmul_tflops.tf32": "fit: 953M Llama-style pp=4 1F1B fp32/TF32 (RESULTS.md pipelines: 284 ms) and the GPT "
                          "dp=4 fp32/TF32 row (52.9 ms)",
    "memory_gbps": "fit (data sheet 4.8 TB/s): eager elementwise kernels of the same rows",
    "intra_gbps": "NCCL all-reduce bus bandwidth over NVLink 4 (900 GB/s bidirectional per GPU); checked against "
                  "the GPT dp=2 x tp=2 and tp=4 rows (45.3 / 35.4 ms), whose activation all-reduces are synchronous",
    "inter_gbps": "400 Gb/s network per GPU = 50 GB/s line rate, about 90% achieved by NCCL rings",
    "latencies": "NCCL ring step latency, typical of NVLink (3 us) and InfiniBand NDR (10 us)",
    "op_overhead_us": "fit: eager dispatch + launch per aten op (forward; backward counts two), hidden behind the "
                      "device's work except for small models (GPT 134M rows)",
    "collective_overhead_us": "fit: per synchronous tensor-parallel collective in the graph (launch, stream wait); "
                              "from the pp=2 x tp=2 and GPT tp rows, which it leaves at -21% / +23%",
    "attention_efficiency": "FlashAttention-2 forward reaches ~60% of dense bf16 GEMM throughput on Hopper",
    "overlap_efficiency": "DDP x4 vs 1 GPU (FACTS.md, 953M): ~9% slower, i.e. about half the all-reduce hidden",
    "step_overhead_s": "host work per optimizer step (syncs, Python), a few ms",
    "checked": "not fitted, predicted within 8% (time) and 7% (memory): the ZeRO-3 rows of "
               "benchmarks/zero3_953m_2026-11-22_h200x4.json and zero3_6.7b_2026-11-22_h200x4.json",
    "reserved_bytes": "CUDA context, NCCL buffers and caching-allocator slack (measured peaks vs held bytes)",
}

_H200 = HardwareProfile(
    name="h200",
    matmul_tflops={"bf16": 520.0, "fp16": 520.0, "tf32": 200.0, "fp32": 50.0},
    memory_gbps=2600.0,
    memory_bytes=int(139.8 * GiB),
    gpus_per_node=8,
    intra_gbps=300.0,
    intra_latency_us=3.0,
    inter_gbps=45.0,
    inter_latency_us=10.0,
    peak_tflops=989.0,
    attention_efficiency=0.6,
    host_memory_bytes=250 * GiB,
    host_memory_gbps=25.0,
    pcie_gbps=25.0,
    op_overhead_us=15.0,
    collective_overhead_us=50.0,
    step_overhead_s=0.003,
    reserved_bytes=2 * GiB,
    sources=H200_SOURCES,
)

_H100 = replace(
    _H200, name="h100", memory_bytes=int(79.1 * GiB), memory_gbps=round(2600.0 * 3.35 / 4.8, 1),
    sources={**H200_SOURCES,
             "memory_bytes": "80 GB HBM3; torch reports 79.1 GiB per GPU",
             "memory_gbps": "H200's fitted value x 3.35/4.8 (data-sheet bandwidth ratio of H100 SXM to H200)"},
)

_CPU = HardwareProfile(
    name="cpu",
    matmul_tflops={"fp32": 0.05, "bf16": 0.01, "fp16": 0.005},
    memory_gbps=5.0,
    memory_bytes=8 * GiB,
    gpus_per_node=64,
    intra_gbps=1.0,
    intra_latency_us=50.0,
    inter_gbps=1.0,
    inter_latency_us=100.0,
    peak_tflops=0.05,
    attention_efficiency=0.5,
    host_memory_bytes=8 * GiB,
    host_memory_gbps=5.0,
    pcie_gbps=50.0,
    op_overhead_us=20.0,
    step_overhead_s=0.001,
    reserved_bytes=0,
    sources={"all": "conservative defaults for a few Gloo ranks sharing a small host; run `autoshard calibrate`"},
)

BUILTIN: dict[str, HardwareProfile] = {p.name: p for p in (_H100, _H200, _CPU)}


def profile_dir() -> str:
    """Where ``autoshard calibrate`` stores profiles: ``$AUTOSHARD_PROFILES`` or ~/.cache/autoshard/profiles."""
    return os.environ.get("AUTOSHARD_PROFILES") or os.path.join(os.path.expanduser("~"), ".cache", "autoshard",
                                                                "profiles")


def get_profile(spec: str | HardwareProfile) -> HardwareProfile:
    """A profile by built-in name (``h100``, ``h200``, ``cpu``), stored name, or path to a JSON file."""
    if isinstance(spec, HardwareProfile):
        return spec
    key = str(spec).strip()
    if key.lower() in BUILTIN:
        return replace(BUILTIN[key.lower()])
    path = key if key.endswith(".json") or os.sep in key else os.path.join(profile_dir(), f"{key}.json")
    if not os.path.isfile(path):
        stored = sorted(f[:-5] for f in os.listdir(profile_dir()) if f.endswith(".json")) \
            if os.path.isdir(profile_dir()) else []
        raise ValueError(f"hardware {spec!r}: not a built-in profile ({', '.join(BUILTIN)}), a stored one "
                         f"({', '.join(stored) or 'none in ' + profile_dir()}) or a profile JSON file")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"hardware profile {path}: not JSON ({e})") from None
    return HardwareProfile.from_dict(data)


def detect_profile(device: torch.device | str | None = None) -> HardwareProfile:
    """The built-in profile for this process's device: h100/h200 by CUDA device name, else cpu.

    Deliberately ignores stored calibrations, so every rank of a job (which may run on different
    hosts) picks the same profile and plans alike; pass a profile explicitly to use a calibration.
    """
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name().upper()
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        base = BUILTIN["h200"] if "H200" in name else BUILTIN["h100"]
        if "H100" in name or "H200" in name:
            return replace(base)
        # another GPU: H100's rates are a guess, its real memory size is not
        return replace(base, name=f"h100-like ({name.lower()})", memory_bytes=int(total))
    return replace(BUILTIN["cpu"])


# ====================================================================================== measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device: torch.device, repeats: int, min_seconds: float = 0.05) -> float:
    """Best-of-``repeats`` seconds per call of ``fn`` (each repeat long enough to time)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = max(time.perf_counter() - t0, 1e-6)
    inner = max(1, int(min_seconds / one))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def measure_matmul(device: torch.device | str, dtype: torch.dtype, n: int = 4096, repeats: int = 3,
                   tf32: bool = False) -> float:
    """Achieved TFLOP/s of an ``n × n @ n × n`` matmul (``tf32`` allows TF32 for float32 on CUDA)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        t = _best_time(lambda: a @ b, device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2.0 * n**3 / t / 1e12


def measure_copy(device: torch.device | str, nbytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Achieved GB/s of a device-to-device copy (read + write counted)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _best_time(lambda: dst.copy_(src), device, repeats)
    return 2.0 * nbytes / t / 1e9


def measure_op_overhead(device: torch.device | str, repeats: int = 3, ops: int = 16) -> float:
    """Microseconds of host time per eager training op: a chain of ``ops`` tiny ops, forward and backward.

    The cost model charges ``3 · ops · overhead`` per micro-batch (forward, and backward as two), so
    the chain's time is divided the same way.
    """
    device = torch.device(device)
    x = torch.ones(8, device=device, requires_grad=True)

    def chain() -> None:
        y = x
        for _ in range(ops):
            y = y * 1.0001
        y.sum().backward()

    t = _best_time(chain, device, repeats)
    return t * 1e6 / (3 * ops)


def allreduce_worker(nbytes_list: list[int], repeats: int = 3) -> dict[str, float]:
    """Run in every rank of a launch: all-reduce bus bandwidth (GB/s) and the latency per ring step (us).

    Bus bandwidth follows NCCL's tests: ``2(p-1)/p · bytes / seconds``; the latency is the time of a
    tiny all-reduce divided by its ``2(p-1)`` ring steps.
    """
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    p = dist.get_world_size()
    out: dict[str, float] = {"ranks": float(p)}

    def timed(nbytes: int) -> float:
        x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
        best = math.inf
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        t = torch.tensor([best], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
        return float(t)

    tiny = timed(4)
    out["latency_us"] = tiny / max(1, 2 * (p - 1)) * 1e6
    bws = [2 * (p - 1) / p * n / max(timed(n) - tiny, 1e-9) / 1e9 for n in nbytes_list]
    out["bus_gbps"] = max(bws)
    return out


def calibrate(device: torch.device | str | None = None, name: str | None = None, quick: bool = False,
              allreduce: dict[str, float] | None = None) -> HardwareProfile:
    """Measure this machine into a profile, starting from the built-in one for its device kind.

    ``allreduce`` is :func:`allreduce_worker`'s result when several processes were measured; it
    sets the intra-node link (one host). Matmul rates are measured for each dtype the device runs.
    """
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = detect_profile(dev)
    n = 1024 if quick else (8192 if dev.type == "cuda" else 2048)
    reps = 2 if quick else 5
    rates: dict[str, float] = {}
    if dev.type == "cuda":
        rates["bf16"] = measure_matmul(dev, torch.bfloat16, n, reps)
        rates["fp16"] = measure_matmul(dev, torch.float16, n, reps)
        rates["tf32"] = measure_matmul(dev, torch.float32, n, reps, tf32=True)
        rates["fp32"] = measure_matmul(dev, torch.float32, n, reps)
    else:
        rates["fp32"] = measure_matmul(dev, torch.float32, n, reps)
        rates["bf16"] = measure_matmul(dev, torch.bfloat16, n // 2, reps)
    mem = measure_copy(dev, (32 if quick else 256) * 2**20, reps)
    overhead = measure_op_overhead(dev, reps)
    when = time.strftime("%Y-%m-%d %H:%M")
    sources = {"matmul_tflops": f"autoshard calibrate {when}: best of {reps} {n}x{n} matmuls per dtype",
               "memory_gbps": f"autoshard calibrate {when}: device copy (read + write)",
               "op_overhead_us": f"autoshard calibrate {when}: a chain of tiny ops, forward and backward"}
    prof = replace(base, name=name or f"{base.name.split(' ')[0]}-calibrated", matmul_tflops=rates,
                   memory_gbps=mem, op_overhead_us=overhead, sources={**base.sources, **sources})
    if dev.type == "cpu":
        prof = replace(prof, peak_tflops=max(rates.values()), host_memory_gbps=mem)
    if allreduce:
        prof = replace(prof, intra_gbps=allreduce["bus_gbps"], intra_latency_us=allreduce["latency_us"],
                       sources={**prof.sources, "intra_gbps": f"autoshard calibrate {when}: all-reduce over "
                                f"{int(allreduce['ranks'])} local ranks"})
    return prof


# ====================================================================================== auto mesh
@dataclass(frozen=True)
class AutoMesh:
    """A request for a mesh whose degrees the planner chooses (``Mesh.auto()``).

    ``autoshard(model, Mesh.auto(), ...)`` plans for ``world_size`` ranks on ``profile`` (detected
    from the device when None) under ``memory_gib`` per rank (the profile's budget when None), then
    builds the real :class:`~autoshard.runtime.mesh.Mesh`.
    """

    world_size: int
    profile: HardwareProfile | str | None = None
    memory_gib: float | None = None
    gpus_per_node: int | None = None
    device: str | None = None
    is_auto: bool = True

    def describe(self) -> str:
        return f"Mesh.auto(world_size={self.world_size})"
