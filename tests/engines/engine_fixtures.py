"""A small bundle folder for engine tests: the real export's component signatures and shape
ranges (encoder, embedding, backbone with per-layer time-major caches, static heads), written and read
through qinyu_edge.bundle. The ONNX files hold placeholder bytes: plans read names and sha256 only;
tests that build engines use the exported tiny presets."""

from __future__ import annotations

from pathlib import Path

from qinyu_edge.bundle import FORMAT_VERSION, Bundle, ComponentSpec, TensorSpec, file_entries, load_bundle, write_manifest
from qinyu_edge.config import preset
from qinyu_edge.tokens import TokenLayout

H = 64
LAYOUT = TokenLayout(im_start=257, im_end=258, begin_of_audio=276, end_of_audio=277, context_of_audio=278, audio=279,
                     end_of_conv=280, speaker=8541, user_speaker=8542, func_start=8539, func_end=8540, audio_start=281)

CACHE_ROW = (1, 2, 16)  # batch, kv heads, head dim of one position of one layer
# Per-layer time-major caches whose first row is a masked null slot: past = 1 + positions.
PAST_RANGE = (1, 513, 4097)


def components(past_range: tuple[int, int, int] = PAST_RANGE) -> tuple[ComponentSpec, ...]:
    caches = [f"{kind}_{layer}" for layer in range(2) for kind in ("key", "value")]
    return (
        ComponentSpec("encoder", "encoder.onnx", (TensorSpec("features", "float32", (1, "frames", 560)),),
                      (TensorSpec("encoder_out", "float32", (1, "rows", H)),), {"frames": (1, 100, 500)}),
        ComponentSpec("embedding", "embedding.onnx", (TensorSpec("ids", "int64", (1, "seq", "ids_per_step")),),
                      (TensorSpec("inputs_embeds", "float32", (1, "seq", H)),),
                      {"seq": (1, 256, 2048), "ids_per_step": (1, 8, 8)}),
        ComponentSpec("backbone", "backbone.onnx",
                      (TensorSpec("inputs_embeds", "float32", (1, "seq", H)),
                       *(TensorSpec(f"past_{c}", "float32", ("past", *CACHE_ROW)) for c in caches)),
                      (TensorSpec("hidden", "float32", (1, H)),
                       *(TensorSpec(f"new_{c}", "float32", ("seq", *CACHE_ROW)) for c in caches)),
                      {"seq": (1, 256, 2048), "past": past_range}),
        ComponentSpec("heads_greedy", "heads_greedy.onnx",
                      (TensorSpec("hidden", "float32", (1, H)), TensorSpec("history", "int64", (1, 5))),
                      (TensorSpec("ids", "int64", (1, 8)),), {}),
    )


def write_bundle(root: Path, precision: dict[str, str] | None = None, source: Bundle | None = None,
                 past_range: tuple[int, int, int] = PAST_RANGE) -> Bundle:
    """The bundle at `root`. With `precision`, a quantized bundle as `quantize_bundle` records one:
    each component's precision in origin, and the fp32 `source` bundle it was made from."""
    root.mkdir(parents=True, exist_ok=True)
    specs = components(past_range)
    held = {c.name: (precision or {}).get(c.name, "fp32") for c in specs}
    for c in specs:
        (root / c.file).write_bytes(f"placeholder graph {c.name} {held[c.name]}".encode())
    origin: dict = {}
    if precision:
        origin["precision"] = held
        origin["quantization"] = {"recipe": "test", "source": {
            "bundle": str(source.root) if source else "/nowhere",
            "files": {n: {"sha256": e.sha256, "bytes": e.bytes} for n, e in (source.files if source else {}).items()}}}
    bundle = Bundle(root=root, format_version=FORMAT_VERSION, qinyu_edge_version="test", config=preset("tiny-8b"),
                    layout=LAYOUT, components={c.name: c for c in specs}, files=file_entries(root, [c.file for c in specs]),
                    origin=origin, opset=17)
    write_manifest(bundle)
    return load_bundle(root)
