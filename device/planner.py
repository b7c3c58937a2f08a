"""Memory planner and decode roofline: does a variant, at given precisions and context length, fit a
target, and how fast can its backbone step?

Pure functions over `ModelConfig` and `Target`. Sizes follow model-spec section 7; everything else
is an assumption written next to its number, to be replaced by what `bench` measures on a device.

Memory counted (all of it on a Jetson, whose DRAM the CPU shares; only the device side on a card):
- weights of every component, at its own precision, with int4/fp4 block scales;
- the KV cache, preallocated for the whole context (time-major, runtime/kv_cache.py); the 4B caches
  the MLA latent plus the rope key, not per-head keys and values;
- activations: TensorRT sizes each engine's scratch for its profile maximum, one layer live at a
  time; attention scores are counted as materialised (fused attention is not assumed). The
  encoder, CAM++, the projectors and the XY decoder never run at once and share one block of
  context memory (runtime/trt_session.py SharedScratch): the largest of them counts, not the sum;
- workspace: the CUDA context with TensorRT/cuBLAS loaded, and per-context tactic scratch;
- the voice loop on the host: Python with onnxruntime and the tokenizer, Silero VAD, Smart Turn,
  audio buffers.
The budget is the target's memory less the system's share, less a safety margin.

The roofline: decoding is bandwidth-bound at batch 1, so steps/s <= bandwidth / bytes read per
step (all layer weights, the full lm_head, and the KV cache up to the position). TensorRT
Edge-LLM's measured Qwen3-4B/8B INT4-AWQ decode (field-notes A1) reaches 73-88 % of this roofline
on Orin NX, AGX Orin and Thor (tests/device/test_planner.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from qinyu_edge.config import PREFILL_CHUNK, ModelConfig, ProjectorConfig, preset
from qinyu_edge.engine_manifest import SHARED_SCRATCH_COMPONENTS
from qinyu_edge.errors import ConfigError

from .targets import GB, PRECISIONS, TARGETS, Target, get_target

# Bytes per stored element, block scales aside.
ELEMENT_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "fp4": 0.5, "int4": 0.5}
# Block formats store a scale per block: int4 weight-only one fp16 scale per 128 weights (group 128,
# the only group size TensorRT Edge-LLM supports on Orin); NVFP4 one fp8 scale per 16. Per-channel
# int8/fp8 scales are one value per output row (<0.05 % here) and are left out.
BLOCK_SCALE_BYTES: dict[str, float] = {"int4": 2 / 128, "fp4": 1 / 16}
QUANTIZED = frozenset({"fp8", "int8", "fp4", "int4"})
KV_PRECISIONS = ("fp32", "fp16", "fp8", "int8")

# Audio steps at 12.5 Hz plus the interleaved text steps (1:8 then 4:8): model-spec 1.8.
SPEECH_STEPS_PER_SECOND = 12.5 + 6.25
# A system prompt, a 10 s question (~170 positions) and one full 1024-step reply.
MIN_USEFUL_CONTEXT = 1536

# Components with a graph (and a TensorRT engine) of their own in a bundle.
ENGINES = ("encoder", "audio_projector", "speaker_projector", "embedding", "backbone", "heads", "xy_decoder",
           "campplus")
ENGINE_SCRATCH_BYTES = 32 * 2**20  # tactic workspace per execution context (UNVERIFIED)
ENCODER_MAX_FRAMES = 500  # the bundle's encoder profile maximum: 30 s of speech at 16.67 Hz
CAMPP_CHUNK_FRAMES = 998  # one 10 s chunk of 100 Hz fbank
# Distinct text tokens a long conversation embeds (its resident share of a memory-mapped table).
TOUCHED_TEXT_ROWS = 4096

# Runtime footprints (UNVERIFIED until `bench` measures them):
# CUDA context with TensorRT, cuBLAS/cuDNN loaded lazily. On a Jetson the libraries' resident pages
# share the DRAM, so the figure is larger than the device-side share on a card.
RUNTIME_UNIFIED_BYTES = int(1.0 * GB)
RUNTIME_DISCRETE_BYTES = int(0.6 * GB)
PYTHON_BYTES = int(0.4 * GB)  # interpreter, numpy, onnxruntime (CPU), tokenizers, the tokenizer itself
SILERO_BYTES = int(0.025 * GB)  # ~2 MB ONNX model plus an onnxruntime CPU session
SMART_TURN_BYTES = int(0.07 * GB)  # Smart Turn v3.2 int8 on CPU: 8 MB model plus session and 8 s of features


def bytes_per_param(precision: str, block_scales: bool = True) -> float:
    return ELEMENT_BYTES[precision] + (BLOCK_SCALE_BYTES.get(precision, 0.0) if block_scales else 0.0)


# --- recipes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Per-component precisions. `backbone` is the transformer layers' matmul weights.
    None means the default: for a quantized backbone, lm_head and embedding stay fp16 (ModelOpt and
    Edge-LLM leave lm_head out of quantization by default); the KV cache is fp16 (fp32 with an fp32
    backbone)."""

    backbone: str
    lm_head: str | None = None
    embedding: str | None = None
    kv_cache: str | None = None
    encoder: str = "fp16"
    projectors: str = "fp16"
    xy_decoder: str = "fp16"
    campplus: str = "fp32"  # 7M parameters; the official code runs it in fp32
    block_scales: bool = True

    @classmethod
    def uniform(cls, precision: str) -> "Recipe":
        """model-spec section 7's convention: every backbone weight at one precision, scales ignored."""
        return cls(precision, lm_head=precision, embedding=precision, block_scales=False)

    @property
    def activation_precision(self) -> str:
        return "fp32" if self.backbone == "fp32" else "fp16"

    def resolved(self) -> "Recipe":
        wide = self.activation_precision
        keep = wide if self.backbone in QUANTIZED else self.backbone
        return dataclasses.replace(self, lm_head=self.lm_head or keep, embedding=self.embedding or keep,
                                   kv_cache=self.kv_cache or wide)

    def weight_precisions(self) -> dict[str, str]:
        r = self.resolved()
        return {"backbone": r.backbone, "lm_head": r.lm_head, "embedding": r.embedding, "encoder": r.encoder,
                "projectors": r.projectors, "xy_decoder": r.xy_decoder, "campplus": r.campplus}  # type: ignore[dict-item]


def check_recipe(recipe: Recipe, target: Target) -> Recipe:
    """The resolved recipe, or a ConfigError naming the precision the target lacks and what it has."""
    r = recipe.resolved()
    for part, p in r.weight_precisions().items():
        if p not in ELEMENT_BYTES:
            raise ConfigError(f"unknown precision {p!r} for {part}; choose one of {', '.join(PRECISIONS)}")
        if not target.supports(p):
            raise ConfigError(f"{target.id} (SM {target.sm}) has no {p} in TensorRT (asked for the {part}); "
                              f"it supports {', '.join(target.precisions)}")
    kv = r.kv_cache
    if kv not in KV_PRECISIONS:
        raise ConfigError(f"unknown KV cache precision {kv!r}; choose one of {', '.join(KV_PRECISIONS)}")
    if not target.supports(kv):  # type: ignore[arg-type]
        raise ConfigError(f"{target.id} (SM {target.sm}) has no {kv} for the KV cache; "
                          f"it supports {', '.join(p for p in KV_PRECISIONS if target.supports(p))}")
    return r


# --- model sizes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneParams:
    linear: int  # transformer-layer 2-D matmul weights: what quantization touches
    norms: int  # RMSNorm weights of the layers and the final norm, kept in the activation dtype
    vocab_matrix: int  # vocab x hidden: the lm_head, and the embedding table (the same matrix when tied)
    tied: bool
    # MLA's kv_b_proj, which the export absorbs into per-head [heads, d, R] matrices: every recipe
    # keeps those 3-D weights in the activation dtype (engines/quantize.py, batched_weight_matmuls).
    batched: int = 0

    def layer_bytes(self, precision: str, block_scales: bool, activation: str) -> float:
        """The layers' weights with their 2-D matmuls at `precision`."""
        return self.linear * bytes_per_param(precision, block_scales) + (self.norms + self.batched) * ELEMENT_BYTES[activation]


def backbone_params(cfg: ModelConfig) -> BackboneParams:
    b = cfg.backbone
    h = b.hidden_size
    matrix = b.vocab_size * h
    layer_norms = 2 * h + (b.q_lora_rank + b.kv_lora_rank if b.is_mla else 2 * b.head_dim)
    norms = b.num_layers * layer_norms + h
    total = b.param_count()
    batched = b.num_layers * b.kv_lora_rank * b.num_attention_heads * (b.qk_nope_head_dim + b.v_head_dim) if b.is_mla else 0
    linear = total - matrix * (1 if b.tie_word_embeddings else 2) - norms - batched
    return BackboneParams(linear, norms, matrix, b.tie_word_embeddings, batched)


def projector_params(p: ProjectorConfig) -> int:
    norm = p.input_size * (2 if p.norm == "layer_norm" else 1)
    return norm + p.input_size * p.hidden_size + p.hidden_size * p.hidden_size


def kv_bytes_per_token(cfg: ModelConfig, precision: str = "fp16") -> int:
    """Cache bytes per position over all layers: K and V per kv head (GQA), or one latent plus the
    shared rope key (MLA)."""
    b = cfg.backbone
    heads = 1 if b.is_mla else b.num_key_value_heads
    return int(b.num_layers * heads * b.cache_width * ELEMENT_BYTES[precision])


def weight_bytes_per_step(cfg: ModelConfig, recipe: Recipe) -> int:
    """Weights one decode step reads: every layer and the whole lm_head (embedding rows are gathered,
    a few KB)."""
    r = recipe.resolved()
    bp = backbone_params(cfg)
    layers = bp.layer_bytes(r.backbone, r.block_scales, r.activation_precision)  # type: ignore[arg-type]
    head = bp.vocab_matrix * bytes_per_param(r.lm_head, r.block_scales)  # type: ignore[arg-type]
    return int(layers + head)


def decode_bytes_per_step(cfg: ModelConfig, recipe: Recipe, position: int) -> int:
    """Bytes read by the decode step at `position`: weights plus the cache of every earlier position."""
    return weight_bytes_per_step(cfg, recipe) + position * kv_bytes_per_token(cfg, recipe.resolved().kv_cache)  # type: ignore[arg-type]


def roofline_steps_per_s(bandwidth_gbs: float, bytes_per_step: int) -> float:
    return bandwidth_gbs * GB / bytes_per_step


# --- memory items --------------------------------------------------------------------------------

Group = Literal["weights", "kv cache", "activations", "workspace", "voice loop"]


@dataclass(frozen=True)
class PlanOptions:
    margin: float = 0.10  # of the memory left after the system's share
    voice_loop: bool = True  # count VAD, turn detector, Python and audio buffers
    # Longest prefill chunk: the runtime prefills in chunks of PREFILL_CHUNK positions and the backbone
    # engine's prefill profile stops there, so TensorRT sizes its scratch for one chunk.
    prefill_tokens: int = PREFILL_CHUNK
    fused_attention: bool = False  # True drops the materialised attention scores from activations
    # The runtime gathers embedding rows on the host from the bundle's memory-mapped table (bundle
    # format 5): only the rows a conversation touches are resident. False: the embedding graph is
    # loaded (older bundles, a quantized table), and then `separate_embedding` says whether a tied
    # model (4B) holds the matrix twice.
    host_embedding: bool = True
    separate_embedding: bool = True
    runtime_bytes: int | None = None  # None: RUNTIME_UNIFIED_BYTES or RUNTIME_DISCRETE_BYTES
    system_reserved_bytes: int | None = None  # None: the target's
    max_turn_seconds: float = 60.0  # longest user turn held in the capture buffer
    # The runtime gives SHARED_SCRATCH_COMPONENTS one context memory; False counts each on its own.
    shared_scratch: bool = True
    # Count VoiceDesign's two graphs (chat --role designing a voice at start; they close after it).
    voice_design: bool = False


@dataclass(frozen=True)
class MemoryItem:
    group: Group
    name: str
    bytes: int
    on_device: bool  # False: host RAM (counted only where the memory is unified)
    note: str = ""


def memory_items(cfg: ModelConfig, target: Target, recipe: Recipe, context: int,
                 options: PlanOptions = PlanOptions()) -> tuple[MemoryItem, ...]:
    r = recipe.resolved()
    s = r.block_scales
    bp = backbone_params(cfg)
    act = ELEMENT_BYTES[r.activation_precision]
    b = cfg.backbone
    items: list[MemoryItem] = []

    def add(group: Group, name: str, nbytes: float, note: str = "", on_device: bool = True) -> None:
        items.append(MemoryItem(group, name, int(nbytes), on_device, note))

    # Weights.
    scale_note = f", group-{128 if r.backbone == 'int4' else 16} scales" if s and r.backbone in BLOCK_SCALE_BYTES else ""
    batched_note = (f"; MLA's {bp.batched / 1e9:.3f}B absorbed per-head params at {r.activation_precision}"
                    if bp.batched and r.backbone != r.activation_precision else "")
    add("weights", "backbone layers", bp.layer_bytes(r.backbone, s, r.activation_precision),  # type: ignore[arg-type]
        f"{bp.linear / 1e9:.3f}B params at {r.backbone}{scale_note}; norms at {r.activation_precision}{batched_note}")
    add("weights", "lm_head", bp.vocab_matrix * bytes_per_param(r.lm_head, s),  # type: ignore[arg-type]
        f"{bp.vocab_matrix / 1e9:.3f}B params at {r.lm_head}" + (" (tied with the embedding)" if bp.tied else ""))
    if options.host_embedding:
        rows = min(b.vocab_size, TOUCHED_TEXT_ROWS + cfg.n_codebooks * cfg.ids_per_book)
        add("weights", "embedding rows (mapped)", rows * b.hidden_size * bytes_per_param(r.embedding, s),  # type: ignore[arg-type]
            f"{rows} of {b.vocab_size} rows resident: every audio codebook row and {TOUCHED_TEXT_ROWS} distinct text "
            f"tokens, from the memory-mapped table at {r.embedding}", on_device=False)
    elif not bp.tied or options.separate_embedding:
        add("weights", "embedding table", bp.vocab_matrix * bytes_per_param(r.embedding, s),  # type: ignore[arg-type]
            f"at {r.embedding}" + ("; a second copy of the tied matrix in the embedding graph" if bp.tied else ""))
    # Parameter counts come from the sub-configs (221.1M, 258.2M and 6.85M at real size, model-spec section 7).
    encoder, matrices = cfg.sensevoice.param_count(), cfg.sensevoice.matrix_param_count()
    if r.encoder in QUANTIZED:  # weight-only: the Linear weights narrow, the rest stays fp16
        add("weights", "SenseVoice encoder", matrices * bytes_per_param(r.encoder, s)
            + (encoder - matrices) * ELEMENT_BYTES["fp16"],
            f"{encoder / 1e6:.1f}M params: {matrices / 1e6:.1f}M Linear weights at {r.encoder}, the rest at fp16")
    else:
        add("weights", "SenseVoice encoder", encoder * bytes_per_param(r.encoder, s),
            f"{encoder / 1e6:.1f}M params at {r.encoder}")
    proj = projector_params(cfg.audio_projector) + projector_params(cfg.speaker_projector)
    add("weights", "audio + speaker projectors", proj * bytes_per_param(r.projectors, s),
        f"{proj / 1e6:.1f}M params at {r.projectors}")
    xy = cfg.xy
    xy_params, tables = xy.param_count(), xy.table_count()
    add("weights", "XY decoder", xy_params * bytes_per_param(r.xy_decoder, s)
        + tables * ELEMENT_BYTES["fp32" if r.xy_decoder == "fp32" else "fp16"],
        f"{xy_params / 1e6:.1f}M params at {r.xy_decoder} + {tables / 1e6:.1f}M codebook, position and ISTFT "
        "table entries")
    campp = cfg.campplus.param_count()
    add("weights", "CAM++", campp * bytes_per_param(r.campplus, s), f"{campp / 1e6:.2f}M params at {r.campplus}")
    if options.voice_design:
        from .voice_design_plan import voice_design_cost

        cost = voice_design_cost(target, r.activation_precision)
        add("weights", "VoiceDesign (start-up only)", cost.weight_bytes,
            f"embedding model + DiT at {r.activation_precision}, closed after the design (~{cost.total_ms:.0f} ms)")

    # KV cache.
    per_token = kv_bytes_per_token(cfg, r.kv_cache)  # type: ignore[arg-type]
    add("kv cache", "KV cache" + (" (MLA latent)" if b.is_mla else ""), context * per_token,
        f"{context} positions x {per_token / 1024:.0f} KiB at {r.kv_cache}")

    # Activations: one layer live at a time.
    chunk = min(options.prefill_tokens, context)
    nh = b.num_attention_heads
    v_dim = b.v_head_dim if b.is_mla else b.head_dim
    per_row = 4 * b.hidden_size + 3 * b.intermediate_size + nh * (b.qk_head_dim + v_dim)
    scores = 0 if options.fused_attention else 2 * nh * chunk * context  # scores and probabilities
    add("activations", "backbone prefill", act * (chunk * per_row + scores) + b.vocab_size * 4,
        f"{chunk}-token chunk against {context} positions"
        + ("" if options.fused_attention else ", attention scores materialised") + "; fp32 logits row")
    sv = cfg.sensevoice
    rows = ENCODER_MAX_FRAMES + len(sv.query_ids)
    enc = rows * (sv.input_size + 4 * sv.output_size + sv.linear_units + 3 * sv.output_size) \
        + 2 * sv.attention_heads * rows * rows
    frames = xy.adapter.max_positions
    d = xy.decoder
    dec = 4 * frames * (4 * d.d_model + d.ffn_dim) + 2 * d.heads * (4 * frames) ** 2 \
        + 8 * frames * (xy.vocos_intermediate + 2 * xy.vocos_dim + xy.n_fft + 2)
    c = cfg.campplus
    between_turns = (
        ("encoder", 2 * enc, f"{ENCODER_MAX_FRAMES} frames (30 s of speech)"),
        ("XY decoder", 2 * dec + 8 * frames * xy.hop_length * 4, f"{frames}-code window (the bundle's profile maximum)"),
        ("CAM++", 4 * 4 * CAMPP_CHUNK_FRAMES * (c.init_channels + c.growth_rate * max(c.block_layers)),
         "one 10 s chunk, fp32"),
    )
    if options.shared_scratch:
        name, nbytes, _ = max(between_turns, key=lambda t: t[1])
        add("activations", "shared scratch", nbytes,
            f"one context memory for {', '.join(SHARED_SCRATCH_COMPONENTS)}: the largest, the {name}'s, counts")
    else:
        for name, nbytes, note in between_turns:
            add("activations", name, nbytes, note)

    # Workspace.
    runtime = options.runtime_bytes
    if runtime is None:
        runtime = RUNTIME_UNIFIED_BYTES if target.unified_memory else RUNTIME_DISCRETE_BYTES
    add("workspace", "CUDA context + TensorRT runtime", runtime, "assumption, UNVERIFIED")
    contexts = len(ENGINES) - (len(SHARED_SCRATCH_COMPONENTS) - 1 if options.shared_scratch else 0)
    add("workspace", "engine scratch", contexts * ENGINE_SCRATCH_BYTES, f"{contexts} context memories x 32 MiB")

    # Voice loop, on the CPU.
    if options.voice_loop:
        add("voice loop", "Python + onnxruntime + tokenizer", PYTHON_BYTES, "assumption, UNVERIFIED", on_device=False)
        add("voice loop", "Silero VAD", SILERO_BYTES, "CPU onnxruntime", on_device=False)
        add("voice loop", "Smart Turn v3.2", SMART_TURN_BYTES, "int8 on CPU", on_device=False)
        reply_seconds = cfg.max_new_tokens / SPEECH_STEPS_PER_SECOND
        audio = 4 * (16000 * options.max_turn_seconds + xy.sample_rate * reply_seconds)
        add("voice loop", "audio buffers", audio,
            f"{options.max_turn_seconds:.0f} s capture at 16 kHz + {reply_seconds:.0f} s reply at "
            f"{xy.sample_rate // 1000} kHz, float32", on_device=False)
    return tuple(items)


def counted_bytes(items: tuple[MemoryItem, ...], target: Target) -> int:
    return sum(i.bytes for i in items if i.on_device or target.unified_memory)


def reserved_bytes(target: Target, options: PlanOptions = PlanOptions()) -> int:
    return target.system_reserved_bytes if options.system_reserved_bytes is None else options.system_reserved_bytes


def budget_bytes(target: Target, options: PlanOptions = PlanOptions()) -> int:
    return int((target.memory_bytes - reserved_bytes(target, options)) * (1 - options.margin))


def total_bytes(cfg: ModelConfig, target: Target, recipe: Recipe, context: int,
                options: PlanOptions = PlanOptions()) -> int:
    return counted_bytes(memory_items(cfg, target, recipe, context, options), target)


def fits(cfg: ModelConfig, target: Target, recipe: Recipe, context: int, options: PlanOptions = PlanOptions()) -> bool:
    return total_bytes(cfg, target, recipe, context, options) <= budget_bytes(target, options)


def longest_context(cfg: ModelConfig, target: Target, recipe: Recipe, options: PlanOptions = PlanOptions()) -> int:
    """The longest context (up to the model's maximum) that fits, or 0 when not even one position
    does. Memory only grows with context, so bisection finds the boundary."""
    if not fits(cfg, target, recipe, 1, options):
        return 0
    lo, hi = 1, cfg.backbone.max_position_embeddings
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(cfg, target, recipe, mid, options):
            lo = mid
        else:
            hi = mid - 1
    return lo


# --- the plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    target: Target
    variant: str
    recipe: Recipe  # resolved
    context: int
    options: PlanOptions
    items: tuple[MemoryItem, ...]
    reserved_bytes: int
    budget_bytes: int
    total_bytes: int
    longest_context: int
    kv_bytes_per_token: int
    weight_bytes_per_step: int
    bytes_per_step: int  # at the last position of the planned context: the slowest step
    alternatives: tuple[str, ...]  # what would fit, when this does not

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def shortfall_bytes(self) -> int:
        return max(0, self.total_bytes - self.budget_bytes)

    @property
    def steps_per_s(self) -> float | None:
        """Roofline at a full cache; None where the bandwidth is unknown."""
        bw = self.target.bandwidth_gbs
        return roofline_steps_per_s(bw, self.bytes_per_step) if bw else None

    @property
    def steps_per_s_empty(self) -> float | None:
        bw = self.target.bandwidth_gbs
        return roofline_steps_per_s(bw, self.weight_bytes_per_step) if bw else None

    @property
    def realtime_factor(self) -> float | None:
        """Roofline steps/s over the steps one second of speech needs; below 1 cannot keep up."""
        sps = self.steps_per_s
        return sps / SPEECH_STEPS_PER_SECOND if sps is not None else None

    def group_bytes(self, group: Group) -> int:
        return sum(i.bytes for i in self.items if i.group == group and (i.on_device or self.target.unified_memory))

    def verdict(self) -> str:
        used = f"{self.total_bytes / GB:.2f} GB of {self.budget_bytes / GB:.2f} GB usable"
        if self.fits:
            return f"fits: {used}; the longest context that fits is {self.longest_context}"
        head = (f"qinyu-{self.variant} at {self.recipe.backbone} with a {self.context}-position context does not fit "
                f"{self.target.name}: needs {used}, short by {self.shortfall_bytes / GB:.2f} GB")
        if self.alternatives:
            return head + ". What would fit: " + "; ".join(self.alternatives) + "."
        return head + ". Nothing smaller of this model fits this target."

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.to_dict(),
            "variant": self.variant,
            "recipe": dataclasses.asdict(self.recipe),
            "context": self.context,
            "options": dataclasses.asdict(self.options),
            "items": [dataclasses.asdict(i) for i in self.items],
            "memory_bytes": self.target.memory_bytes,
            "reserved_bytes": self.reserved_bytes,
            "budget_bytes": self.budget_bytes,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "shortfall_bytes": self.shortfall_bytes,
            "longest_context": self.longest_context,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "weight_bytes_per_step": self.weight_bytes_per_step,
            "bytes_per_step": self.bytes_per_step,
            "steps_per_s": self.steps_per_s,
            "steps_per_s_empty": self.steps_per_s_empty,
            "realtime_factor": self.realtime_factor,
            "alternatives": list(self.alternatives),
        }


def model_for_variant(variant: str) -> ModelConfig:
    if variant not in ("4b", "8b"):
        raise ConfigError(f"unknown variant {variant!r}; choose 4b or 8b")
    return preset(f"qinyu-{variant}")


def make_plan(cfg: ModelConfig, target: Target, recipe: Recipe, context: int,
              options: PlanOptions = PlanOptions()) -> Plan:
    if not 1 <= context <= cfg.backbone.max_position_embeddings:
        raise ConfigError(f"context {context} is out of range: qinyu-{cfg.variant} takes 1 to "
                          f"{cfg.backbone.max_position_embeddings} positions")
    if not 0 <= options.margin < 1:
        raise ConfigError(f"safety margin {options.margin} must be a fraction in [0, 1)")
    r = check_recipe(recipe, target)
    items = memory_items(cfg, target, r, context, options)
    total = counted_bytes(items, target)
    budget = budget_bytes(target, options)
    longest = longest_context(cfg, target, r, options)
    alternatives = () if total <= budget else _alternatives(cfg, target, recipe, context, options, longest)
    return Plan(target, cfg.variant, r, context, options, items, reserved_bytes(target, options), budget, total,
                longest, kv_bytes_per_token(cfg, r.kv_cache), weight_bytes_per_step(cfg, r),  # type: ignore[arg-type]
                decode_bytes_per_step(cfg, r, context), alternatives)


def plan_for(target_id: str, variant: str, precision: str, context: int, options: PlanOptions = PlanOptions(), *,
             lm_head: str | None = None, embedding: str | None = None, kv_cache: str | None = None,
             encoder: str = "fp16") -> Plan:
    """The CLI's entry point: names in, a Plan out, ConfigError for anything unknown or unsupported."""
    recipe = Recipe(precision, lm_head=lm_head, embedding=embedding, kv_cache=kv_cache, encoder=encoder)
    return make_plan(model_for_variant(variant), get_target(target_id), recipe, context, options)


def _alternatives(cfg: ModelConfig, target: Target, recipe: Recipe, context: int, options: PlanOptions,
                  longest: int) -> tuple[str, ...]:
    """What would fit, least invasive first: a shorter context, a lower backbone precision, one copy
    of a tied matrix, an int8 encoder, quantized lm_head and embedding, the smaller variant; then, if
    no single change is enough, the first combination that is; then bigger targets."""
    r = recipe.resolved()

    def note(n: int) -> str:
        return f"fits up to {n} positions" + (f", {context} included" if n >= context else "")

    def lowered(rec: Recipe, p: str) -> Recipe:
        return dataclasses.replace(rec, backbone=p)

    # A mapped embedding table costs only its touched rows: then only the lm_head is worth narrowing.
    heads_flags = "--lm-head {p}" if options.host_embedding else "--lm-head {p} --embedding {p}"

    def quantized_heads(rec: Recipe) -> Recipe:
        if options.host_embedding:
            return dataclasses.replace(rec, lm_head=rec.backbone)
        return dataclasses.replace(rec, lm_head=rec.backbone, embedding=rec.backbone)

    shared = dataclasses.replace(options, separate_embedding=False)
    lower = [p for p in target.precisions if bytes_per_param(p) < bytes_per_param(r.backbone)]
    small = model_for_variant("4b") if cfg.variant == "8b" else None
    can_share = cfg.backbone.tie_word_embeddings and options.separate_embedding and not options.host_embedding

    singles: list[tuple[str, ModelConfig, Recipe, PlanOptions]] = [
        (f"--precision {p}", cfg, lowered(recipe, p), options) for p in lower]
    if can_share:
        singles.append(("--shared-embedding (one copy of the tied matrix: embedding rows gathered from the "
                        "lm_head weights)", cfg, recipe, shared))
    narrow_encoder = r.encoder == "fp16" and target.supports("int8")
    if narrow_encoder:
        singles.append(("--encoder int8 (weight-only on its Linear layers; check accuracy)", cfg,
                        dataclasses.replace(recipe, encoder="int8"), options))
    if r.backbone in QUANTIZED and quantized_heads(r) != r:
        singles.append((heads_flags.format(p=r.backbone) + " (not the default; check accuracy)",
                        cfg, quantized_heads(recipe), options))
    if small is not None:
        singles.append(("--variant 4b", small, recipe, options))

    out: list[str] = []
    if longest >= MIN_USEFUL_CONTEXT:
        out.append(f"--context {longest} (the longest that fits)")
    for desc, c, rec, opts in singles:
        n = longest_context(c, target, rec, opts)
        if n >= MIN_USEFUL_CONTEXT:
            out.append(f"{desc}: {note(n)}")
    if out:
        return tuple(out)

    for p in [r.backbone, *lower]:
        for c in [cfg] + ([small] if small is not None else []):
            rec = lowered(recipe, p)
            parts = [f"--precision {p}"] if p != r.backbone else []
            if p in QUANTIZED:
                rec = quantized_heads(rec)
                parts.append(heads_flags.format(p=p))
            if narrow_encoder:
                rec = dataclasses.replace(rec, encoder="int8")
                parts.append("--encoder int8")
            opts = shared if c.backbone.tie_word_embeddings and can_share else options
            if opts is shared:
                parts.append("--shared-embedding")
            if c is not cfg:
                parts.append("--variant 4b")
            n = longest_context(c, target, rec, opts)
            if n >= MIN_USEFUL_CONTEXT:
                return (f"{' '.join(parts)} (check accuracy): {note(n)}",)

    bigger = [t.id for t in TARGETS.values() if t.memory_bytes > target.memory_bytes
              and all(t.supports(p) for p in r.weight_precisions().values())
              and fits(cfg, t, recipe, context, options)]
    return (f"a target with more memory: {', '.join(bigger)}",) if bigger else ()


__all__ = [
    "ELEMENT_BYTES", "BLOCK_SCALE_BYTES", "KV_PRECISIONS", "SPEECH_STEPS_PER_SECOND", "MIN_USEFUL_CONTEXT",
    "Recipe", "PlanOptions", "MemoryItem", "Plan", "BackboneParams", "bytes_per_param", "check_recipe",
    "backbone_params", "projector_params", "kv_bytes_per_token", "weight_bytes_per_step", "decode_bytes_per_step",
    "roofline_steps_per_s", "memory_items", "counted_bytes", "reserved_bytes", "budget_bytes", "total_bytes", "fits",
    "longest_context", "model_for_variant", "make_plan", "plan_for",
]
