import pytest
import torch

from qinyu_edge.config import ProjectorConfig
from qinyu_edge.export.models.projector import Projector
from qinyu_edge.export.onnx_io import compare, export_onnx, run_onnx


@pytest.mark.parametrize("norm,eps", [("layer_norm", 1e-5), ("rms_norm", 2.0**-7)])
def test_projector_matches_official_layers_and_exports(norm, eps, tmp_path):
    cfg = ProjectorConfig(24, 40, norm, eps)
    torch.manual_seed(0)
    proj = Projector(cfg).eval()
    with torch.no_grad():
        proj.pre_proj_layernorm.weight.uniform_(0.5, 1.5)
    assert set(proj.state_dict()) >= {"pre_proj_layernorm.weight", "mlp.0.weight", "mlp.2.weight"}
    assert (norm == "layer_norm") == ("pre_proj_layernorm.bias" in proj.state_dict())
    # The official modules: torch.nn.LayerNorm / torch.nn.RMSNorm, Linear, GELU, Linear, no biases.
    ref_norm = torch.nn.LayerNorm(24, eps=eps) if norm == "layer_norm" else torch.nn.RMSNorm(24, eps=eps)
    ref = torch.nn.Sequential(ref_norm, torch.nn.Linear(24, 40, bias=False), torch.nn.GELU(),
                              torch.nn.Linear(40, 40, bias=False))
    ref[0].load_state_dict(proj.pre_proj_layernorm.state_dict())
    ref[1].weight.data.copy_(proj.mlp[0].weight)
    ref[3].weight.data.copy_(proj.mlp[2].weight)
    x = torch.randn(1, 13, 24) * 3
    with torch.no_grad():
        torch.testing.assert_close(proj(x), ref(x), rtol=1e-5, atol=1e-6)
        p = export_onnx(proj, (x,), tmp_path / "p.onnx", ["x"], ["y"], {"x": {1: "n"}, "y": {1: "n"}})
        x2 = torch.randn(1, 5, 24)
        err = compare(run_onnx(p, {"x": x2.numpy()}), {"y": proj(x2).numpy()})
    assert err[0].rel <= 1e-5
