"""A loaded bundle: its sessions, the audio frontend, the agent voices and the generator.

Everything the device needs to turn audio into prompt embeddings and run generation, with no torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from qinyu_edge.bundle import (
    DECODE,
    HOST_FILE,
    SPEAKERS_FILE,
    TOKENIZER_FILE,
    Bundle,
    ComponentSpec,
    bundle_weights_sha256,
    check_runnable,
    load_bundle,
)
from qinyu_edge.config import PREFILL_CHUNK, SPEAKER_DIM, CamPPConfig
from qinyu_edge.engine_manifest import SHARED_SCRATCH_COMPONENTS, EngineError, EngineSet
from qinyu_edge.errors import BundleError, CheckpointError
from qinyu_edge.validate import check_context

from .frontend import FrontendConfig, SenseVoiceFrontend, campplus_chunks, campplus_fbank
from .generate import Generator
from .heap import trim_heap
from .host_embedding import HostEmbedding
from .kv_cache import NULL_ROWS, KVCache
from .session import Session, open_session

log = logging.getLogger(__name__)

LAZY_COMPONENT = "heads_logits"  # opened when sampling first needs it


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "ort"  # "trt": the plans of `engines`; components without a plan run in ONNX Runtime
    provider: str = "cpu"
    threads: int | None = None
    context: int | None = None  # KV cache capacity; default: the bundle's largest past
    engines: str | None = None  # engine set folder from `qinyu-edge build` (backend "trt")
    # ONNX Runtime on the CPU runs a component's fused-operator variant where the bundle has one
    # (`Bundle.ort_variants`); False keeps the portable graphs (e.g. to compare the two).
    ort_variants: bool = True
    # A greedy decode step as one call: the bundle's fused `decode` graph and its host embedding
    # table where it has them. False runs the separate graphs (calibration taps each of them).
    fused: bool = True


def _read(bundle: Bundle, name: str, reader):
    """A bundle file through its library's reader; a file the reader cannot parse is a damaged bundle."""
    path = bundle.file(name)
    try:
        return reader(path)
    except Exception as e:  # tokenizers and safetensors raise their own exception types
        raise BundleError(f"{path} cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                          "the bundle is damaged. Copy it again or export it again.") from e


def campplus_vector(session: Session, cfg: CamPPConfig, wav_16k: np.ndarray) -> np.ndarray:
    """CAM++ 192-d vector of a clip: mean over its 10 s chunks (circularly filled), as upstream."""
    chunks = campplus_chunks(wav_16k, cfg.chunk_seconds, cfg.max_seconds)
    feats = np.stack([campplus_fbank(c, cfg.feat_dim) for c in chunks]).astype(np.float32)
    return session.run({"fbank": feats})["embedding"].mean(axis=0)


class Engine:
    def __init__(self, bundle_dir: str | os.PathLike, options: EngineOptions = EngineOptions(), verify: bool = True):
        self.bundle: Bundle = load_bundle(bundle_dir, verify=verify)
        check_runnable(self.bundle)
        self.options = options
        self.config = self.bundle.config
        self.layout = self.bundle.layout
        self.tokenizer = _read(self.bundle, TOKENIZER_FILE, lambda p: Tokenizer.from_file(str(p)))
        self._engine_set = self._open_engine_set()
        self._scratch = None  # a trt_session.SharedScratch once a plan of SHARED_SCRATCH_COMPONENTS opens
        self._unloadable_variants: set[str] = set()
        self.sessions: dict[str, Session] = {}
        # On the CPU, the backbone's fused-operator variant beats a portable fused graph: where only the
        # backbone has one, the split graphs run.
        cpu_variant = self.spec("backbone") is not self.bundle.components["backbone"]
        self.fused = (options.fused and DECODE in self.bundle.components and self._has_plan_or_ort(DECODE)
                      and (self.spec(DECODE) is not self.bundle.components[DECODE] or not cpu_variant))
        self.host_embedding = (HostEmbedding(self.bundle.file(self.bundle.host_embedding), self.config.backbone.vocab_size,
                                             self.config.backbone.hidden_size)
                               if options.fused and self.bundle.host_embedding else None)
        # Graphs a run never calls are not loaded: the fused graph replaces the backbone and the greedy
        # heads, the host table the embedding graph (the 4B's tied matrix is then held once).
        lazy = {LAZY_COMPONENT} | ({"backbone", "heads_greedy"} if self.fused else {DECODE})
        lazy |= {"embedding"} if self.host_embedding is not None else set()
        for name in self.bundle.components:
            if name not in lazy:
                self.session(name)
        host = _read(self.bundle, HOST_FILE, lambda p: load_file(str(p)))
        self.frontend = SenseVoiceFrontend(FrontendConfig.from_sensevoice(self.config.sensevoice),
                                           host["cmvn_shift"], host["cmvn_scale"])
        speakers = self.bundle.file(SPEAKERS_FILE)
        self.voices: dict[str, np.ndarray] = (
            {name: self._checked_voice(vec, f"voice {name!r} of {speakers}")
             for name, vec in _read(self.bundle, SPEAKERS_FILE, lambda p: load_file(str(p))).items()}
            if speakers.is_file() else {}
        )
        largest = self.bundle.components["backbone"].shape_ranges["past"][2] - NULL_ROWS
        capacity = largest if options.context is None else check_context(options.context, largest)
        main = DECODE if self.fused else "backbone"
        self.cache = KVCache.for_backbone(self.spec(main), capacity)
        open_logits = (lambda: self.session(LAZY_COMPONENT)) if LAZY_COMPONENT in self.bundle.components else None
        self.generator = Generator(
            self.host_embedding or self.sessions["embedding"], self.sessions.get("backbone"),
            self.sessions.get("heads_greedy"), open_logits, self.layout, self.config.backbone.hidden_size, self.cache,
            penalty=self.config.repetition_penalty,
            prefill_chunk=min(PREFILL_CHUNK, self.spec(main).shape_ranges["seq"][2]),
            fused=self.sessions[DECODE] if self.fused else None,
        )
        trim_heap()

    def _has_plan_or_ort(self, name: str) -> bool:
        """With an engine set, a component runs as a plan; one built before the fused graph existed
        has none for it, and then the backbone and heads plans serve rather than ONNX Runtime."""
        return self._engine_set is None or name in self._engine_set.engines

    def _open_engine_set(self) -> EngineSet | None:
        opts = self.options
        if opts.backend != "trt":
            if opts.engines is not None:
                raise EngineError("engines are TensorRT plans: use them with the trt backend (--backend trt).")
            return None
        if opts.engines is None:
            raise EngineError("the trt backend runs TensorRT plans: give the engine set folder (--engines DIR) that "
                              f"`qinyu-edge build --bundle {self.bundle.root}` wrote.")
        return EngineSet.load(opts.engines)

    def spec(self, name: str) -> ComponentSpec:
        """The component as this engine runs it: its ONNX Runtime CPU variant where that applies."""
        opts = self.options
        variant = self.bundle.ort_variants.get(name)
        if (variant is not None and opts.ort_variants and opts.backend == "ort" and opts.provider == "cpu"
                and name not in self._unloadable_variants):
            return variant
        return self.bundle.components[name]

    def session(self, name: str) -> Session:
        """The component's session, opened on first use (`heads_logits` is only needed for sampling, and
        holds a second copy of the LM head: 1.3 GB in fp16 on the 8B)."""
        if name in self.sessions:
            return self.sessions[name]
        opts, spec = self.options, self.spec(name)
        entry = None if self._engine_set is None else self._engine_set.engines.get(name)
        if entry is not None:
            # A plan built from a fallback bundle (another precision) cannot be matched to this bundle's file.
            own = entry.bundle == self._engine_set.bundle
            sha = self.bundle.files[spec.file].sha256 if own else None
            weights = bundle_weights_sha256(self.bundle, spec.file) if own else None
            scratch = None
            if name in SHARED_SCRATCH_COMPONENTS:
                if self._scratch is None:
                    from .trt_session import SharedScratch

                    self._scratch = SharedScratch.on_device()
                scratch = self._scratch
            session = open_session(self._engine_set.plan_path(entry), "trt", onnx_sha256=sha, scratch=scratch,
                                   weights_sha256=weights)
        else:
            if self._engine_set is not None:
                log.warning("%s: the engine set %s has no plan for it; it runs in ONNX Runtime", name,
                            self._engine_set.root)
            backend = "ort" if self._engine_set else opts.backend
            try:
                session = open_session(self.bundle.file(spec.file), backend, opts.provider, opts.threads,
                                       spec.ort_disabled_optimizers)
            except Exception as e:  # onnxruntime's errors share no narrower base class
                if spec is self.bundle.components[name]:
                    raise
                # An ONNX Runtime older than the variant's operators: the portable graph does the same work.
                log.warning("%s: ONNX Runtime cannot load its CPU variant %s (%s); running the portable graph. "
                            "Upgrade onnxruntime for the faster one.", name, spec.file, str(e).splitlines()[0])
                self._unloadable_variants.add(name)
                return self.session(name)
        self.sessions[name] = session
        return session

    @property
    def root(self) -> Path:
        return self.bundle.root

    def features(self, wav_16k: np.ndarray) -> np.ndarray:
        return self.frontend(wav_16k)

    def encode_audio(self, features: np.ndarray) -> np.ndarray:
        """LFR+CMVN features [T, 560] -> projected audio embeddings [rows, H] (rows = T+4 on the 8B)."""
        enc = self.sessions["encoder"].run({"features": features[None].astype(np.float32)})["encoder_out"]
        return self.sessions["audio_projector"].run({"encoder_out": enc})["audio_embeds"][0]

    def audio_rows(self, features: np.ndarray) -> int:
        return features.shape[0] + (4 if self.config.keep_query_rows else 0)

    def speaker_vector(self, wav_16k: np.ndarray) -> np.ndarray:
        return campplus_vector(self.sessions["campplus"], self.config.campplus, wav_16k)

    def voice(self, name_or_vector: str | np.ndarray) -> np.ndarray:
        if isinstance(name_or_vector, str):
            if name_or_vector not in self.voices:
                raise BundleError(
                    f"no agent voice named {name_or_vector!r} in {self.root / SPEAKERS_FILE}; "
                    f"known: {', '.join(sorted(self.voices)) or 'none'}. Pass a 192-d vector file instead."
                )
            return self.voices[name_or_vector]
        return self._checked_voice(name_or_vector, "a speaker vector")

    @staticmethod
    def _checked_voice(vector: np.ndarray, what: str) -> np.ndarray:
        vec = np.asarray(vector, np.float32).reshape(-1)
        if vec.shape != (SPEAKER_DIM,) or not np.isfinite(vec).all():
            raise CheckpointError(f"{what} must be {SPEAKER_DIM} finite floats, got shape {vec.shape}"
                                  f"{'' if np.isfinite(vec).all() else ' with NaN or infinite values'}; "
                                  "use another voice, or export the bundle again.")
        return vec

    def prompt_embeds(self, ids: np.ndarray, audio_slots: list[tuple[int, int]], audio_embeds: list[np.ndarray],
                      speaker_slots: list[int], speakers: list[np.ndarray]) -> np.ndarray:
        """Embed the prompt ids and overwrite audio placeholders and speaker positions in sequence order."""
        emb = self.generator.embed(np.asarray(ids, np.int64).reshape(1, -1, 1)).copy()
        for (start, rows), clip in zip(audio_slots, audio_embeds):
            if clip.shape[0] != rows:
                raise ValueError(f"a clip gives {clip.shape[0]} audio rows but the prompt has {rows} placeholders")
            emb[0, start : start + rows] = clip
        if speakers:
            proj = self.sessions["speaker_projector"].run({"speaker": np.stack(speakers).astype(np.float32)})
            for pos, vec in zip(speaker_slots, proj["speaker_embeds"]):
                emb[0, pos] = vec
        return emb
