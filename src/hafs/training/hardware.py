"""What this machine can run, as plain data: devices, memory, precision support, the torch build.

`detect()` is the only function that touches torch (imported inside it); everything else, here and in
the rules that read a `Capabilities` value (preflight.py, hardware_report.py), is tested on any machine
with fakes (axolotl's approach). Nothing here imports transformers or loads a model.
"""

from __future__ import annotations

import json
import os
import platform
import re
import warnings
from dataclasses import asdict, dataclass, field

GIB = 1024 ** 3
DEVICE_ORDER = ("cuda", "mps", "cpu")  # what `device = "auto"` prefers
CU128_HINT = ("install a PyTorch build with CUDA 12.8+ "
              "(pip install torch --index-url https://download.pytorch.org/whl/cu128)")
CU126_HINT = ("install a PyTorch build for CUDA 12.6, the last with kernels for older GPUs "
              "(pip install torch --index-url https://download.pytorch.org/whl/cu126)")


@dataclass(frozen=True)
class CudaGpu:
    """One CUDA device as the installed torch sees it."""

    index: int
    """Device index (cuda:N)."""
    name: str
    """Marketing name, e.g. 'NVIDIA GeForce RTX 5060 Ti'."""
    total_memory_gb: float
    """Device memory in GiB."""
    capability: tuple[int, int]
    """Compute capability (major, minor); sm_120 is (12, 0)."""
    supported_by_build: bool
    """The installed torch has kernels (SASS or compatible PTX) for this capability."""
    bf16: bool
    """Native bf16 (Ampere, capability 8.0, and newer)."""

    @property
    def sm(self) -> str:
        """'sm_120' style name of the capability."""
        return f"sm_{self.capability[0]}{self.capability[1]}"


@dataclass(frozen=True)
class MpsInfo:
    """Apple's Metal backend."""

    available: bool = False
    """torch.backends.mps.is_available()."""
    built: bool = False
    """The torch build includes MPS."""
    macos_version: str = ""
    """macOS version, '' elsewhere."""
    unified_memory_gb: float = 0.0
    """Physical (unified) memory in GiB."""
    working_set_gb: float = 0.0
    """Metal's recommended maximum working set (what MPS may use), 0 when unknown."""
    bf16: bool = False
    """bf16 tensors work on MPS (macOS 14+)."""


@dataclass(frozen=True)
class CpuInfo:
    """The host CPU."""

    model_name: str = ""
    """Brand string, e.g. 'AMD EPYC 9654'."""
    arch: str = ""
    """Machine architecture: x86_64, arm64, aarch64."""
    cores: int = 1
    """Logical cores this process may use."""
    ram_gb: float = 0.0
    """Physical memory in GiB."""
    flags: tuple[str, ...] = ()
    """CPU feature flags (lower case, as /proc/cpuinfo or sysctl names them)."""

    @property
    def avx512_bf16(self) -> bool:
        """AVX-512 BF16 instructions (Cooper Lake, Zen 4 and newer)."""
        return "avx512_bf16" in self.flags

    @property
    def amx_bf16(self) -> bool:
        """AMX tiles with bf16 (Sapphire Rapids and newer)."""
        return "amx_bf16" in self.flags

    @property
    def bf16_fast(self) -> bool:
        """bf16 matmuls run natively; elsewhere bf16 is emulated and slower than fp32."""
        return self.avx512_bf16 or self.amx_bf16 or "bf16" in self.flags or "feat_bf16" in self.flags

    @property
    def fp16_fast(self) -> bool:
        """fp16 arithmetic is native (AVX-512 FP16 / AMX-FP16 / ARM fphp)."""
        return bool({"avx512_fp16", "amx_fp16", "fphp", "feat_fp16"} & set(self.flags))


@dataclass(frozen=True)
class Capabilities:
    """Everything hafs needs to know about the machine; plain data, no torch objects."""

    os: str = ""
    """platform.system(): Linux, Darwin or Windows."""
    os_version: str = ""
    """Kernel or OS release."""
    python_version: str = ""
    """Interpreter version."""
    torch_version: str = ""
    """torch.__version__, '' when torch is not importable."""
    torch_cuda_version: str = ""
    """CUDA version torch was built with, '' for CPU-only builds."""
    cuda_arch_list: tuple[str, ...] = ()
    """torch.cuda.get_arch_list(): the sm_XY / compute_XY targets of the build."""
    gpus: tuple[CudaGpu, ...] = ()
    """CUDA devices visible to torch."""
    mps: MpsInfo = field(default_factory=MpsInfo)
    """Apple MPS backend."""
    cpu: CpuInfo = field(default_factory=CpuInfo)
    """Host CPU and RAM."""
    notes: tuple[str, ...] = ()
    """Things detection could not settle (driver errors)."""

    def usable_gpus(self) -> list[CudaGpu]:
        """GPUs the installed torch can run kernels on."""
        return [g for g in self.gpus if g.supported_by_build]

    def device_kinds(self) -> list[str]:
        """Device kinds present, best first (a CUDA GPU the build cannot drive still counts as present)."""
        return [k for k, present in (("cuda", bool(self.gpus)), ("mps", self.mps.available), ("cpu", True))
                if present]

    def best_device(self) -> str:
        """What `device = "auto"` picks: a usable CUDA GPU, else MPS, else the CPU."""
        return "cuda" if self.usable_gpus() else "mps" if self.mps.available else "cpu"

    def device_memory_gb(self, kind: str) -> float:
        """Memory one training process can use on `kind` (smallest usable GPU; MPS working set; RAM)."""
        if kind == "cuda":
            return min((g.total_memory_gb for g in self.usable_gpus()), default=0.0)
        if kind == "mps":
            return self.mps.working_set_gb or round(self.mps.unified_memory_gb * 2 / 3, 1)
        return self.cpu.ram_gb

    def describe(self, kind: str) -> str:
        """One line naming the device, e.g. 'cuda: NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)'."""
        if kind == "cuda" and self.gpus:
            g = (self.usable_gpus() or list(self.gpus))[0]
            return f"cuda: {g.name} ({g.sm}, {g.total_memory_gb:.1f} GiB)" + (
                f" x{len(self.usable_gpus())}" if len(self.usable_gpus()) > 1 else "")
        if kind == "mps":
            return f"mps: macOS {self.mps.macos_version}, {self.mps.unified_memory_gb:.0f} GiB unified memory"
        return f"cpu: {self.cpu.model_name or self.cpu.arch}, {self.cpu.cores} cores, {self.cpu.ram_gb:.1f} GiB RAM"

    def summary(self, settings=None) -> dict:
        """Short JSON-able description of the device a run uses (metadata.json's hardware info)."""
        kind = str(getattr(settings, "device", "") or self.best_device()).split(":")[0]
        out = {"device": self.describe(kind), "torch": self.torch_version, "cuda": self.torch_cuda_version or None,
               "os": f"{self.os} {self.os_version}".strip(), "cpu": self.cpu.model_name, "cpu_cores": self.cpu.cores,
               "ram_gb": self.cpu.ram_gb, "cpu_bf16": self.cpu.bf16_fast}
        if kind == "cuda":
            out["gpus"] = [{"name": g.name, "sm": g.sm, "memory_gb": g.total_memory_gb} for g in self.usable_gpus()]
        if kind == "mps":
            out["macos"] = self.mps.macos_version
        return out

    def to_dict(self) -> dict:
        """JSON-able dict (for --detect --json and metadata.json)."""
        out = asdict(self)
        out["cpu"].update(avx512_bf16=self.cpu.avx512_bf16, amx_bf16=self.cpu.amx_bf16,
                          bf16_fast=self.cpu.bf16_fast)
        for g, d in zip(self.gpus, out["gpus"]):
            d["sm"] = g.sm
        out.update(device_kinds=self.device_kinds(), best_device=self.best_device())
        return json.loads(json.dumps(out))  # tuples -> lists

    @classmethod
    def from_dict(cls, data: dict) -> Capabilities:
        """Inverse of to_dict (derived keys ignored)."""
        gpus = tuple(CudaGpu(g["index"], g["name"], g["total_memory_gb"], tuple(g["capability"]),
                             g["supported_by_build"], g["bf16"]) for g in data.get("gpus", []))
        cpu = {k: v for k, v in data.get("cpu", {}).items() if k in CpuInfo.__dataclass_fields__}
        cpu["flags"] = tuple(cpu.get("flags", ()))
        return cls(os=data.get("os", ""), os_version=data.get("os_version", ""),
                   python_version=data.get("python_version", ""), torch_version=data.get("torch_version", ""),
                   torch_cuda_version=data.get("torch_cuda_version", ""),
                   cuda_arch_list=tuple(data.get("cuda_arch_list", ())), gpus=gpus,
                   mps=MpsInfo(**data.get("mps", {})), cpu=CpuInfo(**cpu), notes=tuple(data.get("notes", ())))


# ------------------------------------------------------------------ the build-vs-GPU rule (PyTorch's)

def _arch_cc(arch: str) -> tuple[str, int, str]:
    """'sm_90a' -> ('sm', 90, 'a'); 'compute_120' -> ('compute', 120, '')."""
    kind, _, rest = arch.partition("_")
    m = re.fullmatch(r"(\d+)([a-z]?)", rest)
    return (kind, int(m.group(1)), m.group(2)) if m else (kind, -1, "")


def _sass_runs_on(code_cc: int, device_cc: int) -> bool:
    """Binary (SASS) compatibility, as torch.cuda.DEVICE_REQUIREMENT: same major, minor >= the code's,
    except the embedded/iGPU parts (5.3, 6.2, 7.2, 8.7) that only run their own code; 10.1 code runs on 11.0."""
    special = {53: {53}, 62: {62}, 72: {72}, 87: {87}, 101: {101, 110}}
    if code_cc in special:
        return device_cc in special[code_cc]
    if device_cc in (53, 62, 72, 87, 101):  # excluded from every interval but their own
        return device_cc == code_cc
    return device_cc // 10 == code_cc // 10 and device_cc % 10 >= code_cc % 10


def gpu_supported_by_build(capability: tuple[int, int], arch_list) -> bool:
    """Whether a build with `arch_list` (torch.cuda.get_arch_list()) has kernels for `capability`.

    Mirrors torch.cuda._check_capability: an sm_XY target runs on devices of the same major version with
    minor >= Y. A PTX target compute_XY is also JIT-compiled for any newer device ('a'-suffixed ones
    only for exactly XY). An empty list (CPU build, ROCm) means "cannot tell": supported.
    """
    if not arch_list:
        return True
    device_cc = 10 * capability[0] + capability[1]
    for arch in arch_list:
        kind, cc, suffix = _arch_cc(arch)
        if cc < 0:
            continue
        if _sass_runs_on(cc, device_cc):
            return True
        if kind == "compute" and (device_cc == cc if suffix == "a" else device_cc >= cc):
            return True
    return False


def build_phrase(caps: Capabilities) -> str:
    """'PyTorch 2.13.0 (CUDA 12.8)': the installed build, for messages."""
    if not caps.torch_version:
        return "torch (not installed)"
    return f"PyTorch {caps.torch_version}" + (f" (CUDA {caps.torch_cuda_version})" if caps.torch_cuda_version else "")


def install_hint(capability: tuple[int, int]) -> str:
    """What to install so torch can drive a GPU of `capability`."""
    return CU128_HINT if capability[0] >= 10 else CU126_HINT if capability < (7, 5) else (
        "install a PyTorch CUDA build from https://pytorch.org/get-started/locally/")


# ------------------------------------------------------------------ detection

def detect() -> Capabilities:
    """Look at this machine (imports torch; never raises: what cannot be read is left empty)."""
    cpu, notes = _detect_cpu(), []
    base = {"os": platform.system(), "os_version": platform.release(), "python_version": platform.python_version(),
                "cpu": cpu}
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install is still a machine to describe
        return Capabilities(**base, notes=(f"torch is not importable: {exc}",))
    gpus, arch_list = [], ()
    try:
        if torch.cuda.is_available():
            arch_list = tuple(torch.cuda.get_arch_list())
            with warnings.catch_warnings():  # torch warns about unsupported GPUs; we report it ourselves
                warnings.simplefilter("ignore")
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    cap = (int(p.major), int(p.minor))
                    ok = True if torch.version.hip else gpu_supported_by_build(cap, arch_list)
                    gpus.append(CudaGpu(i, p.name, round(p.total_memory / GIB, 2), cap, ok,
                                        bf16=bool(torch.version.hip) or cap[0] >= 8))
    except Exception as exc:  # noqa: BLE001 - a driver mismatch must not stop detection
        notes.append(f"CUDA could not be queried: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return Capabilities(**base, torch_version=torch.__version__, torch_cuda_version=torch.version.cuda or "",
                        cuda_arch_list=arch_list, gpus=tuple(gpus), mps=_detect_mps(torch, cpu),
                        notes=tuple(notes))


def _detect_mps(torch, cpu: CpuInfo) -> MpsInfo:
    backend = getattr(torch.backends, "mps", None)
    built = bool(backend and backend.is_built())
    available = bool(backend and backend.is_available())
    working_set = bf16 = 0.0
    if available:
        try:
            working_set = torch.mps.recommended_max_memory() / GIB
        except Exception:  # noqa: BLE001 - older torch
            working_set = 0.0
        try:
            torch.ones(1, dtype=torch.bfloat16, device="mps")
            bf16 = True
        except Exception:  # noqa: BLE001 - macOS < 14 raises here
            bf16 = False
    return MpsInfo(available=available, built=built, macos_version=platform.mac_ver()[0],
                   unified_memory_gb=cpu.ram_gb if platform.system() == "Darwin" else 0.0,
                   working_set_gb=round(working_set, 1), bf16=bool(bf16))


def _detect_cpu() -> CpuInfo:
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.lower().split())
    except OSError:
        pass
    model = model or platform.processor()
    if platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string") or model
        flags |= {k.rsplit(".", 1)[-1].lower() for k in ("hw.optional.arm.FEAT_BF16", "hw.optional.arm.FEAT_FP16")
                  if _sysctl(k) == "1"}
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return CpuInfo(model_name=model, arch=platform.machine(), cores=cores, ram_gb=round(_ram_bytes() / GIB, 1),
                   flags=tuple(sorted(flags)))


def _sysctl(key: str) -> str:
    import subprocess

    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    try:  # Windows
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                        ("ullTotalPhys", ctypes.c_ulonglong), ("rest", ctypes.c_ulonglong * 6)]

        status = _Status(dwLength=ctypes.sizeof(_Status))
        ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
        return int(status.ullTotalPhys)
    except Exception:  # noqa: BLE001
        return 0
