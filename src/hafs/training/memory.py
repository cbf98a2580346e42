"""Peak training memory predicted from a model's config.json alone: no weights loaded, no torch import.

The activation terms count what autograd keeps for backward in a Qwen2/Llama-style decoder trained with
peft LoRA (checked tensor by tensor with `saved_tensors_hooks`; tests/test_memory.py keeps it so):
  * each RMSNorm keeps its fp32 upcast input (4·h bytes per token);
  * each LoRA module keeps its input cast to the adapter dtype (fp32), or under autocast a half copy,
    plus the dropout mask (in the input's dtype on CPU/MPS, one byte from CUDA's fused kernel);
  * SDPA keeps q, k, v, the output and the log-sum-exp: linear in sequence length. With a mask (packed
    rows, padding) transformers repeats k/v per query head and each layer keeps an additive mask copy;
    eager attention also keeps the probabilities (fp32 softmax + a half copy): quadratic;
  * the SwiGLU MLP keeps gate, silu(gate) and up (3·intermediate values per token).
Logits are never batch×seq×vocab: hafs.training.loss computes lm_head + cross-entropy on labelled positions
in chunks and their gradient in the forward pass, so one chunk's logits are live at a time.
bench/memory_accuracy.py compares these figures with measured peaks (CPU RSS, CUDA max_memory_allocated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import HardwareError, Problem

GIB = 1024 ** 3
ATTN_IMPLS = ("sdpa", "eager", "flash_attention_2", "hafs_varlen_sdpa")
VARLEN_ATTN = ("flash_attention_2", "hafs_varlen_sdpa")
"""Attention kernels that read packed boundaries from position_ids: no [B, 1, T, T] mask."""
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Memory inside the measured figure that no tensor formula covers (allocator slack, oneDNN/cuBLAS
# workspaces, autograd bookkeeping), and memory outside it (interpreter + torch/transformers imports on
# CPU, the CUDA context or Metal runtime on a GPU). Calibrated by bench/memory_accuracy.py.
FRAMEWORK_OVERHEAD_GB = {"cpu": 0.06, "cuda": 0.065, "mps": 0.25}
RUNTIME_GB = {"cpu": 0.45, "cuda": 0.6, "mps": 0.6}
# Fraction of activation + loss memory added for allocator behaviour. glibc's default malloc raises its
# mmap threshold after the first large free, so freed activations stay in the heap and peak RSS settles
# well above the live tensors; with a fixed threshold (`release_freed_memory`) RSS follows the tensors.
FRAGMENTATION = {"cpu": 0.35, "cpu-mmap": 0.0, "cuda": 0.05, "mps": 0.10}
CPU_ALLOCATORS = ("glibc", "mmap")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that decide its memory, read from config.json."""

    hidden: int
    """hidden_size: width of the residual stream."""
    layers: int
    """num_hidden_layers."""
    heads: int
    """num_attention_heads (query heads)."""
    kv_heads: int
    """num_key_value_heads (grouped-query attention); equals heads without GQA."""
    head_dim: int
    """Width of one attention head."""
    intermediate: int
    """intermediate_size of the gated MLP."""
    vocab: int
    """vocab_size: rows of the embedding and of lm_head."""
    tied: bool
    """tie_word_embeddings: lm_head shares the embedding matrix."""
    qkv_bias: bool = True
    """Whether q/k/v projections carry a bias (Qwen2: yes; Llama: attention_bias)."""
    model_type: str = ""
    """config.json's model_type, for messages."""

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        """Read the shape; raises HardwareError naming the missing key for configs we cannot read."""
        config = config.get("text_config", config) if isinstance(config.get("text_config"), dict) else config

        def get(*names, default=None):
            for name in names:
                if config.get(name) is not None:
                    return config[name]
            if default is None:
                raise HardwareError([Problem(f"cannot estimate memory: config has no '{names[0]}'", file=source,
                                             hint="the estimate understands decoder-only configs "
                                                  "(Qwen2, Llama, Mistral, GPT-2 style); use --force to skip it")])
            return default

        hidden = int(get("hidden_size", "n_embd", "d_model"))
        heads = int(get("num_attention_heads", "n_head"))
        model_type = str(config.get("model_type", ""))
        return cls(
            hidden=hidden, layers=int(get("num_hidden_layers", "n_layer", "num_layers")), heads=heads,
            kv_heads=int(get("num_key_value_heads", default=heads)),
            head_dim=int(get("head_dim", default=hidden // heads)),
            intermediate=int(get("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
            vocab=int(get("vocab_size")), tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)), model_type=model_type)

    def module_dims(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one decoder layer, by peft target name."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_parameter_count(self) -> int:
        """Parameters of one decoder layer (what fsdp shards)."""
        per_layer = sum(i * o for i, o in self.module_dims().values()) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        return per_layer

    def parameter_count(self) -> int:
        """Parameters of the base model (tied embeddings counted once)."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_parameter_count() + embed + self.hidden

    def lora_parameter_count(self, r: int, targets) -> int:
        """Adapter parameters for rank r on the named modules of every layer (unknown names: none)."""
        dims = self.module_dims()
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in set(targets) if t in dims)


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak memory of one training run, by part, in GiB."""

    weights_gb: float
    """Frozen base-model weights."""
    lora_gb: float
    """LoRA parameters + gradients + AdamW moments (fp32 adapters: 16 bytes per parameter)."""
    activations_gb: float
    """Tensors kept for backward, plus the largest working set of one layer's backward."""
    logits_gb: float
    """lm_head logits and cross-entropy buffers of one loss chunk, plus the labelled hidden states' gradient."""
    overhead_gb: float
    """Framework memory inside the measured peak: allocator fragmentation, kernel workspaces."""
    runtime_gb: float
    """Memory outside the measured peak: interpreter and imports (CPU), CUDA context or Metal runtime."""
    settings: dict = field(default_factory=dict)
    """The inputs of the estimate (shape, tokens, precision, ...), for display and --json."""
    inputs: dict = field(default_factory=dict, repr=False)
    """The keyword arguments of `estimate_memory`, so suggestions can vary them."""
    shape: ModelShape | None = field(default=None, repr=False)
    """The model shape the estimate was made for."""

    @property
    def measurable_gb(self) -> float:
        """What `bench/memory_accuracy.py` measures: RSS growth on CPU, max_memory_allocated on CUDA."""
        return self.weights_gb + self.lora_gb + self.activations_gb + self.logits_gb + self.overhead_gb

    @property
    def total_gb(self) -> float:
        """Everything the run needs on the device; compared with the profile's available_memory_gb."""
        return self.measurable_gb + self.runtime_gb

    def to_dict(self) -> dict:
        """JSON-able breakdown."""
        out = {k: getattr(self, k) for k in ("weights_gb", "lora_gb", "activations_gb", "logits_gb",
                                             "overhead_gb", "runtime_gb")}
        return {**out, "measurable_gb": self.measurable_gb, "total_gb": self.total_gb, "settings": self.settings}

    def render(self) -> str:
        """The breakdown as aligned lines, for --dry-run."""
        s = self.settings
        shards = s.get("weight_shards", 1)
        sharded = f", layers sharded over {shards} workers" if shards > 1 else ""
        packed = " + 2 packed copies of the linears" if s.get("packed_weights") else ""
        rows = [("frozen weights", self.weights_gb, (f"{s.get('parameters', 0) / 1e6:,.0f}M params in "
                                                    f"{s.get('precision', '')}{sharded}{packed}")),
                ("LoRA params+grads+AdamW", self.lora_gb, f"{s.get('lora_parameters', 0) / 1e6:,.2f}M params, fp32"),
                ("activations", self.activations_gb, f"{s.get('tokens', 0):,} tokens, attention {s.get('attn_impl')}"
                 + _checkpointed_text(s)),
                ("logits/loss buffers", self.logits_gb, (f"chunks of {s.get('loss_chunk', 0):,} tokens x "
                                                        f"{s.get('vocab', 0):,} vocab")),
                ("framework overhead", self.overhead_gb, "allocator, workspaces, cached matmul primitives"),
                ("runtime", self.runtime_gb, s.get("runtime_note", ""))]
        lines = [f"{name:<25}{gb:7.2f} GiB  {why}" for name, gb, why in rows]
        return "\n".join(lines + [f"{'total':<25}{self.total_gb:7.2f} GiB  ({s.get('device_kind', '?')})"])


def gib(value: float) -> str:
    """A memory size in GiB for messages: one decimal, none for whole numbers (8.3, 24)."""
    return f"{value:.1f}".removesuffix(".0")


def checkpointed_count(layers: int, gradient_checkpointing: bool, checkpointed_layers: int | None) -> int:
    """Decoder layers checkpointed: none without checkpointing, else `checkpointed_layers` (None: all)."""
    if not gradient_checkpointing:
        return 0
    return layers if checkpointed_layers is None else max(0, min(int(checkpointed_layers), layers))


def _checkpointed_text(settings: dict) -> str:
    checked, layers = settings.get("checkpointed_layers", 0), settings.get("layers", 0)
    if not settings.get("gradient_checkpointing"):
        return ""
    return ", checkpointed" if checked >= layers else f", {checked} of {layers} layers checkpointed"


def default_loss_chunk(vocab: int) -> int:
    """Labelled tokens per lm_head/cross-entropy chunk when the run does not set one (the trainer's rule)."""
    try:
        from .loss import default_chunk_size
    except ImportError:  # pragma: no cover - loss.py ships with hafs
        return 1024
    return default_chunk_size(vocab)


def estimate_memory(model_config, *, sequence_length: int, batch_size: int, lora_r: int, lora_targets,
                    precision: str, gradient_checkpointing: bool, packing: bool, attn_impl: str = "sdpa",
                    device_kind: str = "cpu", lora_dropout: float = 0.05, loss_chunk_tokens: int | None = None,
                    labelled_fraction: float = 1.0, autocast: bool | None = None,
                    dropout_mask_bytes: int | None = None, lora_input_cast: bool = True,
                    lean_kernels: bool = False, lean_rms_norm: bool = False, cpu_allocator: str = "glibc",
                    weight_shards: int = 1, packed_weights: bool = False,
                    primitive_cache_entries: int | None = None,
                    checkpointed_layers: int | None = None) -> MemoryEstimate:
    """Predict the peak memory of LoRA training; see the module docstring for what each term counts.

    `model_config` is a config.json dict (or a ModelShape). `labelled_fraction` is the share of tokens
    with a loss (1.0, the default, is the worst case). `autocast` (default: on unless fp32) runs the fp32
    adapters' matmuls in the compute dtype, so their saved inputs are half-width copies; `lora_input_cast`
    is peft's cast of the adapter input to fp32 (the engine turns it off under autocast). `lean_kernels`:
    hafs.training.kernels' LoRA and SwiGLU forwards (one saved input per sibling group, byte masks, no
    silu(gate)); `lean_rms_norm`: its RMSNorm (keeps the input as is, not an fp32 copy).
    `loss_chunk_tokens` defaults to the trainer's rule (loss.default_chunk_size). `cpu_allocator`:
    "glibc" (the default malloc) or "mmap" (after `release_freed_memory()`).
    `weight_shards`: workers the decoder layers are sharded over (distributed = "fsdp"); per worker.
    `packed_weights`: packed_linear's two extra copies of every frozen Linear weight and the LM head.
    `checkpointed_layers`: with gradient_checkpointing, how many decoder layers (the first ones) are
    checkpointed; None: all of them.
    """
    inputs = {k: v for k, v in locals().items() if k != "model_config"}
    if attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
    shape = model_config if isinstance(model_config, ModelShape) else ModelShape.from_config(model_config)
    device = device_kind.split(":")[0] if device_kind.split(":")[0] in RUNTIME_GB else "cpu"
    act = DTYPE_BYTES[precision]
    autocast = precision != "fp32" if autocast is None else autocast
    seq, batch = int(sequence_length), int(batch_size)
    tokens = seq * batch
    h, dims = shape.hidden, shape.module_dims()
    targets = [t for t in dict.fromkeys(lora_targets) if t in dims]

    params = shape.parameter_count()
    lora_params = shape.lora_parameter_count(lora_r, targets)
    weights = params * act
    if weight_shards > 1:
        # fsdp (distributed.shard_frozen_base): each worker holds 1/shards of every layer, plus the
        # layer being computed and the next one prefetched, whole; embeddings and head replicated.
        layer = shape.layer_parameter_count()
        weights = (params - shape.layers * layer + shape.layers * layer / weight_shards + 2 * layer) * act
    if packed_weights:
        linear = shape.layers * sum(i * o for i, o in dims.values()) + shape.vocab * h
        weights += 2 * linear * act
    lora = lora_params * 16  # fp32 param + grad + AdamW exp_avg + exp_avg_sq

    if dropout_mask_bytes is None:  # CPU/MPS dropout multiplies by a mask in the input's dtype; CUDA's is bytes
        dropout_mask_bytes = 1 if device == "cuda" else 4 if lora_input_cast else act
    if lean_kernels:
        dropout_mask_bytes = 1
    per_token_layer = _layer_bytes_per_token(shape, targets, act, lora_r, lora_dropout, dropout_mask_bytes,
                                             act if autocast else 4, lean_kernels, lean_rms_norm)
    # transformers repeats k/v for SDPA whenever there is a mask (use_gqa_in_sdpa), except on MPS; packing,
    # padding (batch > 1) and eager attention all bring one. Varlen kernels need no mask and do GQA natively.
    varlen = attn_impl in VARLEN_ATTN
    masked = not varlen and (packing or batch > 1 or attn_impl == "eager")
    kv_width = shape.heads if (masked and device != "mps") else shape.kv_heads
    # q, k, v, output, and the flash kernel's log-sum-exp (fp32 per query head).
    attn = (2 * shape.heads + 2 * kv_width) * shape.head_dim * act + shape.heads * 4
    per_layer = tokens * (per_token_layer + attn)
    if device == "cpu" and attn_impl == "hafs_varlen_sdpa" and act == 2:
        # attention.block_causal_attention keeps bf16 probabilities (worst case: one example per row)
        # and neither its output nor a log-sum-exp. A micro-batch's examples are split into calls
        # within its per-call budget (attention.length_groups), so all of them keep probabilities
        # whenever one example's fit; an example over it alone takes the flash kernel, which keeps none.
        from .attention import saved_probabilities, within_block_budget

        if within_block_budget(1, shape.heads, seq):
            probs = batch * shape.heads * saved_probabilities(seq) * act
            per_layer += probs - tokens * shape.heads * (4 + shape.head_dim * act)
    if attn_impl == "eager":
        per_layer += batch * shape.heads * seq * seq * (4 + act)  # fp32 softmax + its cast copy
    checked = checkpointed_count(shape.layers, gradient_checkpointing, checkpointed_layers)
    # The [B,1,T,T] bool mask is shared; each layer's SDPA converts it to an additive copy it keeps
    # (a checkpointed layer only while backward recomputes it, one at a time).
    mask_copies = 0 if not masked else shape.layers - checked + (1 if checked else 0)
    mask = batch * seq * seq * (1 + act * mask_copies) if masked else 0
    # Non-reentrant checkpointing keeps each checkpointed layer's input; backward recomputes one
    # layer at a time, once the layers after it (which keep everything) have freed theirs.
    kept = checked * tokens * h * act + max(shape.layers - checked, 1 if checked else 0) * per_layer
    if not checked:
        # The first layer's input comes from frozen embeddings and needs no gradient, so its first norm
        # keeps nothing and dropout on the modules it feeds keeps no mask.
        fed = 0 if lean_kernels else sum(dims[t][0] for t in targets if t in ("q_proj", "k_proj", "v_proj",
                                                                               "gate_proj", "up_proj"))
        kept -= tokens * (4 * h + (fed * dropout_mask_bytes if lora_dropout > 0 else 0))
    # Backward of one layer needs about one layer's activations as gradients; plus the residual-stream
    # gradient (fp32 from the final norm), the final norm's input and the rotary tables.
    saved = kept + mask + tokens * h * 4 + tokens * shape.head_dim * 2 * act  # + final norm input, rotary
    activations = saved + per_layer + tokens * h * 2 * act
    if packed_weights:
        from .packed_linear import PIECE_ROWS

        if tokens > PIECE_ROWS:  # a packed matmul over more rows runs in pieces, then joins them: for a moment
            activations += tokens * max(max(d) for d in dims.values()) * act  # its widest output exists twice

    labelled = max(1, int(tokens * labelled_fraction))
    chunk = min(loss_chunk_tokens or default_loss_chunk(shape.vocab), labelled)
    # Per chunk: logits in the compute dtype, their fp32 softmax/gradient (in place), the gradient cast back;
    # across chunks: the gathered labelled hidden states and their gradient (computed in the forward pass).
    logits = chunk * shape.vocab * (4 + (act if act < 4 else 0)) + 2 * labelled * h * act

    frag = FRAGMENTATION["cpu-mmap" if device == "cpu" and cpu_allocator == "mmap" else device]
    overhead = FRAMEWORK_OVERHEAD_GB[device] * GIB + frag * (activations + logits)
    if device == "cpu":  # cached matmul primitives: the run's cap (RunSettings.onednn_cache_capacity), 0 = default
        from .packed_linear import CACHE_ENTRY_BYTES, primitive_cache_capacity

        entries = primitive_cache_capacity(seq) if primitive_cache_entries is None else primitive_cache_entries
        overhead += (entries or 1024) * CACHE_ENTRY_BYTES
    runtime_note = {"cpu": "Python, torch, transformers (outside the measured peak)",
                    "cuda": "CUDA context and allocator reserve", "mps": "Metal runtime"}[device]
    settings = {"model_type": shape.model_type, "parameters": params, "lora_parameters": lora_params,
                    "precision": precision, "tokens": tokens, "sequence_length": seq, "batch_size": batch,
                    "attn_impl": attn_impl, "gradient_checkpointing": bool(checked),
                    "checkpointed_layers": checked, "layers": shape.layers,
                    "packing": bool(packing), "loss_chunk": chunk, "vocab": shape.vocab, "device_kind": device,
                    "lora_r": lora_r, "lora_targets": targets, "runtime_note": runtime_note,
                    "cpu_allocator": cpu_allocator if device == "cpu" else "", "saved_bytes": saved,
                    "weight_shards": int(weight_shards), "packed_weights": bool(packed_weights)}
    return MemoryEstimate(weights_gb=weights / GIB, lora_gb=lora / GIB, activations_gb=activations / GIB,
                          logits_gb=logits / GIB, overhead_gb=overhead / GIB, runtime_gb=RUNTIME_GB[device],
                          settings=settings, inputs=inputs, shape=shape)


def _layer_bytes_per_token(shape: ModelShape, targets, act: int, r: int, dropout: float, mask_bytes: int,
                           lora_in_bytes: int, lean: bool = False, lean_rms_norm: bool = False) -> int:
    """Bytes one decoder layer keeps for backward per token, apart from attention's q/k/v/out."""
    dims = shape.module_dims()
    total = 2 * shape.hidden * 4  # two RMSNorms keep their fp32 input
    if lean_rms_norm:
        total = 2 * (shape.hidden * act + 4)  # kernels.rms_norm_forward: the input as is, and fp32 rstd
    if lean:
        total += 2 * shape.intermediate * act  # gate and up (silu(gate) is recomputed)
        # Sibling adapters share one saved input (q/k/v: the first norm's output; gate/up: the second's)
        # and each keeps its byte mask and its r-wide activation.
        groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp", "up_proj": "mlp"}
        inputs = {groups.get(t, t): dims[t][0] for t in targets}
        total += sum(inputs.values()) * act
        return total + sum(dims[t][0] * (mask_bytes if dropout > 0 else 0) + r * act for t in targets)
    total += 3 * shape.intermediate * act  # gate, silu(gate), up
    for name in targets:
        d_in = dims[name][0]
        # lora_A keeps its input: the fp32 cast (or dropout output), or under autocast its half copy;
        # dropout adds its mask. lora_B keeps lora_A's output.
        total += d_in * lora_in_bytes + (d_in * mask_bytes if dropout > 0 else 0) + r * lora_in_bytes
    return total


def release_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Make glibc return freed large blocks to the OS (fixed mmap threshold); False where unavailable.

    glibc raises its mmap threshold (up to 32 MiB) after the first large free, so activation buffers
    freed in backward stay in the heap and peak RSS settles ~1.5x above the live tensors (benchmark
    shape, 4x1024 tokens: 1.9 GB vs 1.2 GB). A fixed threshold keeps RSS at what is really in use.
    Call once, before the model is built; then pass cpu_allocator="mmap" to the estimate.
    """
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold = -3  # from malloc.h; setting it also turns off the dynamic adjustment
        return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))
    except (OSError, AttributeError):  # musl or another libc: nothing to tune
        return False
