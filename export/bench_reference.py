"""The PyTorch side of `qinyu-edge bench --against torch`: the same weights as a bundle, as modules.

Kept in `export/` (torch land) so the device-side bench imports torch only through this module,
and only when asked to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qinyu_edge.device.bench import GPU_PROVIDERS
from qinyu_edge.errors import QinyuError



class TorchReference:
    """The bundle's model as PyTorch modules on one device, with the calls the bench times. Each call
    runs under `torch.inference_mode()`, as the reference generation loop runs under no_grad."""

    def __init__(self, model: Any, device: str, source: str):
        import torch

        self.torch = torch
        self.model = model
        self.device = device
        self.source = source
        for m in (model.encoder, model.audio_projector, model.speaker_projector, model.backbone, model.xy):
            m.to(device)
        self.sync: Callable[[], None] | None = torch.cuda.synchronize if device.startswith("cuda") else None

    @classmethod
    def for_bundle(cls, bundle: Any, device: str | None, provider: str, threads: int | None = None
                   ) -> TorchReference:
        """The weights the bundle was exported from: the checkpoint folders in bundle.json's origin
        (for a tiny preset, loaded as `load_preset` loads them), else the preset rebuilt by name."""
        import torch
        from qinyu_edge.export.qinyu_checkpoint import load_preset, load_qinyu

        from qinyu_edge.config import preset

        origin = bundle.origin
        name = origin.get("preset")
        folders = [origin.get(k) for k in ("checkpoint", "sensevoice", "models")]
        present = all(f and Path(f).is_dir() for f in folders)
        if name and present:
            model = load_qinyu(*folders, name=name, campplus_config=preset(name).campplus, tiny=True)
            source = f"preset {name} from the folders it was exported from ({folders[0]})"
        elif name:
            model = load_preset(name)
            source = f"load_preset({name!r}) (the export's folders are gone; rebuilt with seed 0)"
        elif present:
            model = load_qinyu(*folders)
            source = f"load_qinyu({', '.join(folders)})"
        else:
            raise QinyuError(
                f"--against torch needs the checkpoint folders bundle {bundle.root} was exported from; bundle.json "
                f"names {', '.join(str(f) for f in folders)}, which are not all here. Copy them back to those paths "
                "or run the bench where the export ran.")
        if device is None:
            device = "cuda" if provider in GPU_PROVIDERS and torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)  # the same CPU threads as ONNX Runtime was given
        return cls(model.eval(), device, source)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "device": self.device, "torch": self.torch_version,
                "threads": self.torch.get_num_threads()}

    @property
    def torch_version(self) -> str:
        return str(self.torch.__version__)

    def tensor(self, a: np.ndarray) -> Any:
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def run(self, module: str, *inputs: Any) -> Any:
        """One of the model's modules (encoder, audio_projector, speaker_projector, xy) on torch inputs."""
        with self.torch.inference_mode():
            return getattr(self.model, module)(*inputs)

    def encoder_inputs(self, feats: np.ndarray) -> tuple[Any, Any]:
        x = self.tensor(feats[None].astype(np.float32))
        return self.run("encoder", x), x

    def _past(self, ctx: int, seed: int = 0) -> tuple[Any, ...]:
        bb = self.model.backbone
        g = np.random.default_rng(seed)
        return tuple(self.tensor(g.standard_normal(bb.cache_shape(ctx)).astype(np.float32)) for _ in bb.cache_names)

    def decode_step(self, ctx: int, x: np.ndarray) -> Callable[[], Any]:
        """One position at context `ctx`, the new position appended by torch.cat as the reference loop
        grows its cache (the grown cache is dropped, so every call runs at `ctx`)."""
        past, xt, bb, torch = self._past(ctx), self.tensor(x), self.model.backbone, self.torch

        def step() -> Any:
            with torch.inference_mode():
                out = bb.step(xt, *past)
                return [torch.cat([p, n], dim=0) for p, n in zip(past, out[1:])]

        return step

    def parity(self, engine: Any) -> dict[str, float]:
        """Relative error of the bundle's ONNX against these modules on the same inputs: proof that
        both sides hold the same weights."""
        from qinyu_edge.export.onnx_io import compare

        g = np.random.default_rng(7)
        feats = g.standard_normal((40, self.model.config.sensevoice.input_size)).astype(np.float32)
        codes = g.integers(0, 1024, (1, 8, 24)).astype(np.int64)
        x = g.standard_normal((1, 1, self.model.config.backbone.hidden_size)).astype(np.float32)
        past = self._past(16, seed=3)
        feeds = {"inputs_embeds": x, "past_length": np.array([16], np.int64),
                 **{n: p.cpu().numpy() for n, p in zip(engine.cache.names_in, past)}}
        with self.torch.inference_mode():
            ref = {
                "encoder": {"encoder_out": self.model.encoder(self.tensor(feats[None])).cpu().numpy()},
                "xy_decoder": {"wav": self.model.xy(self.tensor(codes)).cpu().numpy()},
                "backbone": {"hidden": self.model.backbone.step(self.tensor(x), *past)[0].cpu().numpy()},
            }
        ours = {
            "encoder": engine.sessions["encoder"].run({"features": feats[None]}),
            "xy_decoder": engine.sessions["xy_decoder"].run({"codes": codes}),
            "backbone": engine.session("backbone").run(feeds),
        }
        return {name: max(e.rel for e in compare(ours[name], r)) for name, r in ref.items()}
