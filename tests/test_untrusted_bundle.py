"""A bundle.json is untrusted input: names confined to the bundle, every used file hash-checked, voices checked."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from qinyu_edge.bundle import file_entries, load_bundle
from qinyu_edge.bundle_paths import inside
from qinyu_edge.errors import BundleError, CheckpointError, QinyuError
from qinyu_edge.fileio import sha256_file


@pytest.fixture(scope="module")
def source():
    from qinyu_edge.export.bundle_export import preset_bundle

    return preset_bundle("tiny-8b")


@pytest.fixture
def copy(source, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(source, out)
    return out


def edit(root, change):
    path = root / "bundle.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def relist(root, d, *names):
    """Record the current size and sha256 of `names` in the manifest dict `d` (what an attacker can do too)."""
    for n, e in file_entries(root, list(names)).items():
        d["files"][n] = {"sha256": e.sha256, "bytes": e.bytes}


def test_inside_refuses_every_way_out(tmp_path):
    root = tmp_path / "b"
    root.mkdir()
    (root / "ok.onnx").write_bytes(b"x")
    (root / "alias.onnx").symlink_to(root / "ok.onnx")  # a link within the folder is fine
    assert inside(root, "ok.onnx") == root / "ok.onnx"
    assert inside(root, "alias.onnx") == root / "alias.onnx"
    (tmp_path / "secret").write_text("s")
    (root / "out.onnx").symlink_to(tmp_path / "secret")
    for bad in ("../secret", "/etc/passwd", "a/../../secret", "out.onnx", "", "C:\\x", "..\\secret"):
        with pytest.raises(BundleError, match="outside|relative"):
            inside(root, bad)


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd"])
def test_run_refuses_files_outside_the_bundle(copy, name):
    edit(copy, lambda d: d["files"].update({name: {"sha256": "0" * 64, "bytes": 1}}))
    with pytest.raises(BundleError, match="only relative names"):
        load_bundle(copy)


def test_component_outside_the_bundle_is_refused(copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.copy(copy / "campplus.onnx", outside)
    edit(copy, lambda d: d["components"]["campplus"].update(file=str(outside)))
    with pytest.raises(BundleError, match="only relative names"):
        load_bundle(copy)
    edit(copy, lambda d: d["components"]["campplus"].update(file="campplus.onnx"))
    (copy / "campplus.onnx").unlink()
    (copy / "campplus.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="symlink .* outside the folder"):
        load_bundle(copy)


def test_quantize_never_writes_outside_out(source, tmp_path):
    """Old code: copy2(src.root / name, tmp / name) with name `../../evil/x.txt` read the bundle's own
    file beside it and overwrote the victim beside --out."""
    from qinyu_edge.engines.quantize import quantize_bundle

    root = tmp_path / "src" / "a" / "b"  # two levels deeper than the partial folder beside --out
    shutil.copytree(source, root)
    (tmp_path / "src" / "evil").mkdir()
    (tmp_path / "src" / "evil" / "x.txt").write_text("evil")
    victim = tmp_path / "evil" / "x.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    name = "../../evil/x.txt"
    edit(root, lambda d: d["files"].update(
        {name: {"sha256": sha256_file(tmp_path / "src" / "evil" / "x.txt"), "bytes": 4}}))
    with pytest.raises(BundleError, match="only relative names"):
        quantize_bundle(root, tmp_path / "out" / "q", "fp16")
    assert victim.read_text() == "precious"


def test_every_used_file_must_be_listed(copy, flip_byte):
    def unlist(d):
        del d["files"]["backbone.onnx"]

    edit(copy, unlist)
    flip_byte(copy / "backbone.onnx")
    with pytest.raises(BundleError, match="backbone.onnx: used but not listed"):
        load_bundle(copy)
    edit(copy, lambda d: d.update(files={}))
    with pytest.raises(BundleError) as e:
        load_bundle(copy)
    for name in ("tokenizer.json", "speakers.safetensors", "host.safetensors", "backbone_ort.onnx", "xy_decoder.onnx"):
        assert f"{name}: used but not listed" in str(e.value)


def test_side_files_must_be_listed(copy):
    (copy / "encoder.onnx.data").write_bytes(b"weights")
    with pytest.raises(BundleError, match="encoder.onnx.data: used but not listed"):
        load_bundle(copy)


def test_manifest_shape_errors_are_clear(copy):
    path = copy / "bundle.json"
    original = path.read_text()
    path.write_text("[1, 2]")
    with pytest.raises(BundleError, match="not an object"):
        load_bundle(copy)
    path.write_text(original)
    edit(copy, lambda d: d.update(format_version="4"))
    with pytest.raises(BundleError, match="not an integer") as e:
        load_bundle(copy)
    assert "newer" not in str(e.value)
    path.write_text(original)
    edit(copy, lambda d: d["components"]["encoder"].update(file="tokenizer.json"))
    with pytest.raises(BundleError, match="not an .onnx graph"):
        load_bundle(copy)
    path.write_text(original)
    edit(copy, lambda d: d["components"].pop("campplus"))
    from qinyu_edge.runtime.engine import Engine

    with pytest.raises(BundleError, match="no component campplus"):
        Engine(copy)


def test_bundle_voices_are_checked(copy):
    from qinyu_edge.runtime.engine import Engine

    for bad, what in ((np.full(192, np.nan, np.float32), "NaN"), (np.zeros(100, np.float32), "shape")):
        save_file({"tian": bad}, str(copy / "speakers.safetensors"))
        edit(copy, lambda d: relist(copy, d, "speakers.safetensors"))
        with pytest.raises(CheckpointError, match=f"voice 'tian' .*192 finite floats.*{what}"):
            Engine(copy)


def test_unlisted_or_corrupt_tokenizer_is_refused(copy):
    from qinyu_edge.runtime.engine import Engine

    (copy / "tokenizer.json").write_text("{not json")
    with pytest.raises(BundleError, match="tokenizer.json: 9 bytes"):
        Engine(copy)
    edit(copy, lambda d: relist(copy, d, "tokenizer.json"))  # listed but corrupt: the reader says so
    with pytest.raises(BundleError, match="tokenizer.json cannot be read"):
        Engine(copy)


def test_context_beyond_the_bundle_is_refused(source):
    from qinyu_edge.runtime.engine import Engine, EngineOptions

    with pytest.raises(QinyuError, match="--context 100000 is beyond this bundle"):
        Engine(source, EngineOptions(context=100000))


def test_a_weights_file_outside_the_bundle_is_refused(copy):
    """A graph's recorded side files are hashed for engine checks: none may name a file elsewhere."""
    edit(copy, lambda d: d["components"]["campplus"].update(data_files=["../../../../etc/passwd"]))
    with pytest.raises(BundleError, match="only relative names"):
        load_bundle(copy)


def test_component_names_are_plain(copy):
    """A component name becomes NAME.plan in an engine set and a calibration folder: `../x` would escape."""
    edit(copy, lambda d: d["components"].update({"../../escape": d["components"]["campplus"]}))
    with pytest.raises(BundleError, match="not a plain name"):
        load_bundle(copy)

