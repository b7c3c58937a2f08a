"""A built wheel carries the four folders under the one namespace, plus the demo WAV."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_the_folders_into_qinyu_edge(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("qinyu_edge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module in ("qinyu_edge/export/onnx_io.py", "qinyu_edge/export/models/backbone.py",
                   "qinyu_edge/runtime/generate.py", "qinyu_edge/engines/__init__.py",
                   "qinyu_edge/device/targets.py", "qinyu_edge/data/demo_question.wav"):
        assert module in names, module
    assert not any(n.split("/")[0] in ("export", "runtime", "engines", "device") for n in names)
    # Import from the wheel alone (zipimport), away from the source tree.
    code = ("import qinyu_edge.export, qinyu_edge.runtime, qinyu_edge.engines, qinyu_edge.device, "
            "qinyu_edge.runtime.prompt as p; assert '.whl' in p.__file__, p.__file__")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={"PYTHONPATH": str(wheel)})


def test_editable_install_resolves_to_this_tree():
    code = "import qinyu_edge.runtime.engine as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd="/")
    assert Path(out.stdout.strip()).resolve() == ROOT / "runtime" / "engine.py"
