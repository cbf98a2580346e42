"""How a plan runs on this machine: precision and the speed options that interact with it.

Every option that depends on another (precision ⇒ weight dtype ⇒ autocast ⇒ loss scaling; device ⇒
attention kernel ⇒ dropout kernel) is settled here, once, by `run_settings`, with the reason next
to each decision. The engine, the model loader and the memory check read the resulting
`RunSettings`; none of them re-derives a setting. The figures quoted are from bench/bench_train.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass, field

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VARLEN_ATTENTION = "hafs_varlen_sdpa"
"""attention.VARLEN_ATTENTION (repeated here so this module stays import-light)."""


@dataclass
class RunSettings:
    """The resolved way to run one plan here. Plain data: printed, stored in metadata, passed around."""

    device: str = "cpu"
    """Torch device: cpu, cuda (or cuda:N) or mps."""
    precision: str = "fp32"
    """Compute precision actually used: bf16, fp16 or fp32."""
    weight_dtype: str = "float32"
    """dtype of the frozen base weights (LoRA parameters are always fp32)."""
    autocast_dtype: str | None = None
    """dtype of torch.autocast around forward (None: no autocast)."""
    grad_scaler: bool = False
    """Scale the loss (fp16 only: its range is too small for small gradients)."""
    attn_implementation: str = "sdpa"
    """transformers attention implementation."""
    packing: bool = True
    """Pack several examples per row (else one example per row, rows of similar length batched)."""
    padding_free: bool = False
    """Lay a micro-batch's rows end to end in one row: no padding; examples kept apart by position_ids."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (non-reentrant); memory for time."""
    checkpointed_layers: int | None = None
    """With checkpointing: how many decoder layers, the first ones (None: all; memory_check picks fewer)."""
    loss_chunk_size: int | None = None
    """Labelled tokens per lm_head/cross-entropy chunk (None: sized by vocabulary)."""
    bf16_loss_softmax: bool = False
    """Training loss in bf16 compute: softmax straight from the bf16 logits (loss.py), no fp32 copy."""
    fast_dropout: bool = False
    """Draw LoRA dropout masks with kernels.keep_mask (cheap RNG, same keep probability)."""
    lean_kernels: bool = True
    """kernels.patch_model: leaner LoRA Linear and SwiGLU MLP forwards (same math, less memory traffic)."""
    lean_rms_norm: bool = False
    """kernels.rms_norm_forward for the model's RMSNorms (no fp32 copy of the input kept)."""
    lean_rotary: bool = False
    """kernels.patch_rotary: the rotary embedding of q and k as one autograd node (same values)."""
    packed_weights: bool = False
    """Frozen bf16 Linear weights pre-packed for oneDNN during training (packed_linear; CPU, costs 2 copies)."""
    onednn_cache_capacity: int = 0
    """Matmul primitives torch's oneDNN caches keep (packed_linear.limit_primitive_cache; 0: their default, 1,024)."""
    cpu_allocator: str = "glibc"
    """CPU malloc: glibc as is, or "mmap" after memory.release_freed_memory() (see run_settings)."""
    liger: bool = False
    """Apply Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) to the base model."""
    fused_optimizer: bool = False
    """AdamW(fused=True) (CUDA, CPU); otherwise the foreach implementation."""
    compile: bool = False
    """torch.compile the decoder layers."""
    sdpa_cudnn: bool = False
    """Let SDPA pick cuDNN's attention on CUDA (False: flash or memory-efficient kernels only; see run_settings)."""
    notes: list[str] = field(default_factory=list)
    """Decisions worth telling the user (fallbacks, forced options)."""

    def to_dict(self) -> dict:
        """Plain dict for metadata.json."""
        return asdict(self)

    def torch_dtype(self, name: str | None = None):
        """torch dtype of `name` (default: the weight dtype)."""
        import torch

        return getattr(torch, name or self.weight_dtype)

    def autocast(self):
        """Context manager for forward passes: autocast to the compute dtype, or nothing."""
        import contextlib

        import torch

        if not self.autocast_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.split(":")[0], dtype=getattr(torch, self.autocast_dtype))

    def attention_kernels(self):
        """Context manager around a whole training loop, backward included: checkpointing recomputes a
        layer's forward inside backward, and must pick the same SDPA kernel as the forward did."""
        import contextlib

        if self.sdpa_cudnn or not self.device.startswith("cuda"):
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def describe(self) -> str:
        """One line for the run header."""
        parts = [f"device {self.device}", f"precision {self.precision}",
                 f"weights {self.weight_dtype}", f"attention {self.attn_implementation}",
                 "packing" if self.packing else "length-grouped batches"]
        if self.padding_free:
            parts.append("padding-free")
        if self.gradient_checkpointing:
            some = "" if self.checkpointed_layers is None else f" (first {self.checkpointed_layers} layers)"
            parts.append("gradient checkpointing" + some)
        if self.liger:
            parts.append("liger kernels")
        if self.compile:
            parts.append("torch.compile")
        if not self.sdpa_cudnn and self.device.startswith("cuda"):
            parts.append("no cuDNN attention")
        return ", ".join(parts)


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def resolve_device(kind: str, caps=None) -> str:
    """'auto' → what the machine has (CUDA, then MPS, then CPU); anything else as given."""
    if kind != "auto":
        return kind
    if caps is not None:
        return caps.best_device()
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_bf16_fast(caps=None) -> bool:
    """Native bf16 matmuls on this CPU (AVX-512 BF16, AMX, ARM BF16); else bf16 is emulated."""
    if caps is not None:
        return bool(caps.cpu.bf16_fast)
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_bf16(caps=None) -> bool:
    """The first CUDA GPU does bf16 natively (compute capability 8.0+: Ampere and newer)."""
    if caps is not None and caps.gpus:
        return tuple(caps.gpus[0].capability) >= (8, 0)
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def cuda_visible(caps=None) -> bool:
    """A CUDA GPU is visible to this process."""
    if caps is not None:
        return bool(caps.gpus)
    import torch

    return torch.cuda.is_available()


def settle_precision(precision: str, device: str, caps=None) -> tuple[str, str | None]:
    """(precision usable here, note or None): the plan's choice, downgraded only when the device lacks it."""
    kind = device.split(":")[0]
    if kind == "cpu":
        if precision == "bf16" and not cpu_bf16_fast(caps):
            return "fp32", "this CPU has no native bf16 (AVX-512 BF16/AMX): training in fp32"
        if precision == "fp16":
            # CPU fp16 matmuls are emulated (slower than fp32) and would need loss scaling too.
            return "fp32", "fp16 is not fast on CPUs: training in fp32"
    # No CUDA GPU here at all (a dry run on a laptop for a cloud profile): pre-flight reports that,
    # and the profile's own precision is the best guess of what will run there.
    if kind == "cuda" and precision == "bf16" and cuda_visible(caps) and not cuda_bf16(caps):
        return "fp16", "this GPU has no bf16 (compute capability < 8.0): training in fp16 with loss scaling"
    return precision, None


def choose_attention(device: str, precision: str, packing: bool = True) -> str:
    """The attention implementation for this device (see the comments for the measurements)."""
    kind = device.split(":")[0]
    if kind == "cuda" and precision in ("bf16", "fp16") and installed("flash_attn"):
        # FlashAttention-2 reads position_ids as varlen boundaries: packed rows cost what their
        # examples cost, with no T×T mask. Half precision only.
        return "flash_attention_2"
    if kind == "cpu":
        # transformers' sdpa turns packed position_ids into a dense [B,1,T,T] mask, and the CPU
        # flash kernel then computes every T×T block. Per-example causal attention (attention.py)
        # computes only the examples' own triangles, in bf16 with attention.block_causal_attention up
        # to its memory budget (1.7-2.6x faster than the CPU flash kernel, fwd + bwd, 128-1,024 tokens).
        return VARLEN_ATTENTION
    return "sdpa"


def run_settings(plan, caps=None) -> RunSettings:
    """Settle every run option for `plan` on this machine (`caps`: hardware.detect(), optional)."""
    s = RunSettings(notes=[])
    s.device = resolve_device(plan.device, caps)
    kind = s.device.split(":")[0]
    s.precision, note = settle_precision(plan.precision, s.device, caps)
    if note:
        s.notes.append(note)
    # Frozen base weights are stored in the compute dtype: half the memory, and autocast has
    # nothing to cast per step. LoRA weights stay fp32 (created after loading) so small updates
    # (lr x grad ~ 1e-6 relative) are not rounded away; autocast runs their matmuls in half.
    s.weight_dtype = DTYPES[s.precision]
    s.autocast_dtype = None if s.precision == "fp32" else DTYPES[s.precision]
    # fp16 has 5 exponent bits: without loss scaling small gradients flush to zero.
    s.grad_scaler = s.precision == "fp16"
    s.packing = bool(plan.packing)
    s.attn_implementation = choose_attention(s.device, s.precision, s.packing)
    # The CPU attention (attention.varlen_attention_forward) keeps the examples of a row apart and
    # batches those of similar length, so the rows of a micro-batch can be laid end to end: the
    # 8% padding of the CPU benchmark's length-grouped batches no longer goes through every
    # matmul. Same examples per step, same loss. CUDA batches are launch-bound and were not
    # measured this way, so they keep their rows.
    s.padding_free = s.attn_implementation == VARLEN_ATTENTION and kind == "cpu"
    # Checkpointing trades ~30% more compute for memory; only when asked for. A plan that leaves
    # it unset gets it from memory_check.check_plan when the estimate does not fit.
    s.gradient_checkpointing = bool(plan.gradient_checkpointing)
    # PyTorch's CPU dropout draws one mt19937 number per element: at LoRA's input widths that was
    # as slow as the layer's matmuls. CUDA's dropout (Philox, fused) is cheap: keep it there.
    s.fast_dropout = kind == "cpu"
    # Liger's Triton kernels (RMSNorm, SwiGLU, RoPE) do each op in one launch, but a Triton launch
    # costs the host more than the few torch kernels of ours, and a LoRA step on a GPU waits on the
    # host: on the H200 benchmark (2026-11-27, 100 steps each, same data) hafs's own kernels ran
    # 3,899 tokens/s against Liger's 3,462, at the same peak memory (12.41 / 12.44 GB). So ours are
    # the default; `liger` stays a lever the benchmark can turn on (--run-set liger=true).
    s.liger = False
    # One fused kernel over all adapter tensors: on this CPU 0.49 ms per step for 64 LoRA tensors
    # against 1.35 ms for foreach (torch >= 2.4 has the CPU kernel; MPS's is left untried).
    s.fused_optimizer = kind in ("cuda", "cpu")
    # peft's LoRA keeps a dropped copy of the input per adapter and makes extra passes for the
    # dropout rescale and `* scaling`; kernels.lora_forward computes the same sum, with its frozen
    # matmul, in one node keeping one shared input and byte masks (2% faster than peft's forward on
    # the CPU benchmark, bench_levers.py), and the SwiGLU MLP does not keep silu(gate): 21% fewer
    # saved activation bytes.
    s.lean_kernels = True
    # RMSNorm without the fp32 copies: 1.4x fwd + bwd on this CPU; on CUDA in bf16, with lean_rotary,
    # faster than Liger's (above). Not in fp16 (GPUs without bf16): its backward rounds a row factor
    # that scales with rstd² to fp16, where GradScaler's 2^16 could overflow it; transformers' stays
    # fp32 there. MPS keeps transformers' too (not measured there).
    s.lean_rms_norm = kind == "cpu" or (kind == "cuda" and s.precision == "bf16")
    # The chunked loss's softmax straight from bf16 logits: 1.5-2.5x faster per chunk on this CPU
    # than an fp32 copy and five passes over it; GPUs keep the fp32 path (not measured there).
    s.bf16_loss_softmax = kind == "cpu" and s.autocast_dtype == "bfloat16"
    # Rotary embedding as one node: transformers' makes a rotate_half copy, two products and a sum
    # (and their transposes in backward). Where the RMSNorm is lean: measured together on CUDA.
    s.lean_rotary = s.lean_rms_norm
    # A CPU bf16 matmul reorders its plain weight into oneDNN's blocked layout on every call, forward
    # and backward; the frozen weights are packed once per run instead (packed_linear): 3-5% per
    # step on this CPU, same values (and q, k, v with adapters as one node, fused_qkv: ~1.3% more, its
    # input gradient one sum instead of three roundings), for two copies of those weights while the run lasts
    # (memory_check drops it when they would not fit). Not with fsdp: its layers are sharded.
    s.packed_weights = (kind == "cpu" and s.weight_dtype == "bfloat16"
                        and getattr(getattr(plan, "hardware", None), "distributed", None) != "fsdp")
    # glibc's allocator keeps freed activations in its heap and fragments (peak RSS 3.2 GB vs 1.8
    # GB live on the CPU benchmark); a fixed mmap threshold returns them but page-faults every big
    # allocation again (+11% CPU time at 1 MiB, +43% at 64 KiB). Speed first: glibc stays, and
    # the peak is still below TRL's (2.9 vs 4.7 GB) on the same data.
    s.cpu_allocator = "glibc"
    # torch's oneDNN bindings (ideep) and oneDNN itself each cache up to 1,024 matmul primitives, with
    # their JIT code and scratchpads. Length-grouped batches bring new shapes nearly every step, so the
    # caches only grow: over the benchmark's epoch they took peak RSS from 1.4 to 2.3 GB and made the
    # epoch 5-10% slower. Capped at what one step reuses (every layer repeats the first one's shapes:
    # packed_linear.primitive_cache_capacity), the memory stays flat (memory.estimate_memory counts
    # it); a cap below that re-creates primitives every layer (3x slower attention at 1,024 tokens).
    if kind == "cpu":
        from .packed_linear import primitive_cache_capacity

        s.onednn_cache_capacity = primitive_cache_capacity(int(getattr(plan, "sequence_length", 0) or 2048))
    # torch.compile: on CPU, compiling the training graph took longer than the benchmark's whole
    # epoch, so it is off; nothing here turns it on yet.
    s.compile = False
    # cuDNN's SDPA builds an execution graph for every new shape, and length-grouped batches bring new
    # ones nearly every step: in torch.profiler over the H100 benchmark's hafs row (2026-11-27) its
    # forward and backward took 25% of the host's time (1.4 ms per call) in steps that kept the GPU
    # 8% busy. Flash / memory-efficient attention have no per-shape setup: on the H200 benchmark
    # (2026-11-27, 100 steps each, same data) 3,462 tokens/s without cuDNN against 2,261 with it.
    # engine.train holds the choice around the whole loop (attention_kernels), backward included.
    s.sdpa_cudnn = False
    return s
