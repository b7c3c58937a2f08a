"""The TensorRT session's checks and bookkeeping that run without TensorRT: refusing a tampered or
foreign plan before deserializing, saying how to install TensorRT, routing from open_session, and
the host mirror that keeps the KV cache's past from being uploaded again each step."""

from __future__ import annotations

import numpy as np
import pytest
from test_manifest import entry_for, plan_blob

from qinyu_edge.engine_manifest import EngineError, EngineSet
from qinyu_edge.runtime.kv_cache import NULL_ROWS, WINDOW_STEP, KVCache
from qinyu_edge.runtime.session import open_session
from qinyu_edge.runtime.trt_session import HostMirror, SharedScratch, TensorRTMissing, TrtSession, cuda_check


def _engine_set(tmp_path, data: bytes, on_disk: bytes | None = None):
    root = tmp_path / "engines"
    root.mkdir()
    (root / "backbone.plan").write_bytes(data if on_disk is None else on_disk)
    EngineSet(root, "orin-nano-8", "/data/bundle", {"backbone": entry_for(data)}).write()
    return root / "backbone.plan"


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


def test_onnx_files_and_plans_without_manifest_are_refused(tmp_path):
    with pytest.raises(EngineError, match="is an ONNX file.*qinyu-edge build"):
        TrtSession(tmp_path / "backbone.onnx")
    (tmp_path / "backbone.plan").write_bytes(plan_blob())
    with pytest.raises(EngineError, match="not an engine set"):
        TrtSession(tmp_path / "backbone.plan")


def test_tampered_plan_is_refused_before_tensorrt_is_touched(tmp_path):
    data = plan_blob()
    bad = bytearray(data)
    bad[40] ^= 0xFF
    path = _engine_set(tmp_path, data, bytes(bad))
    with pytest.raises(EngineError, match="changed after it was built") as e:
        TrtSession(path)
    assert "rebuild it: qinyu-edge build --bundle /data/bundle --target orin-nano-8" in str(e.value)


def test_plan_whose_onnx_changed_is_refused(tmp_path):
    path = _engine_set(tmp_path, plan_blob())
    with pytest.raises(EngineError, match="backbone.onnx changed"):
        TrtSession(path, onnx_sha256="00" * 32)


@pytest.mark.skipif(_has_tensorrt(), reason="TensorRT is installed here; this is about machines without it")
def test_a_sound_plan_without_tensorrt_says_how_to_install_it(tmp_path):
    path = _engine_set(tmp_path, plan_blob())
    with pytest.raises(TensorRTMissing, match="not installed here.*(JetPack|pip install tensorrt)"):
        TrtSession(path)
    with pytest.raises(TensorRTMissing):
        open_session(path, backend="trt")


def test_cuda_errors_are_named():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed here")
    err, count = cudart.cudaGetDeviceCount()
    if int(err) == 0 and count > 0:
        pytest.skip("a GPU is present: this checks the driverless error path")
    with pytest.raises(Exception, match="CUDA cudaMalloc.*failed: cudaError"):
        cuda_check(cudart, cudart.cudaMalloc(1024), "cudaMalloc(1024)")


class FakeDevice:
    """The device side modelled with host arrays: applies exactly the copies HostMirror asks for."""

    def __init__(self, nbytes: int):
        self.mem = np.zeros(nbytes, np.uint8)
        self.uploaded = 0

    def upload(self, mirror: HostMirror, host: np.ndarray) -> None:
        start, count = mirror.upload(host.ctypes.data, host.nbytes)
        flat = host.reshape(-1).view(np.uint8)
        self.mem[start : start + count] = flat[start : start + count]
        self.uploaded += count

    def absorb(self, mirror: HostMirror, written: np.ndarray) -> None:
        offset = mirror.absorb(written.ctypes.data, written.nbytes, self.mem.nbytes)
        if offset is not None:
            self.mem[offset : offset + written.nbytes] = written.reshape(-1).view(np.uint8)


def test_kv_cache_past_is_uploaded_once_then_never_again():
    """The runtime's own KVCache feeding a mirrored input: its window and the new rows written into
    the slot behind the past. After the first upload of each window size nothing is uploaded again."""
    rng = np.random.default_rng(0)
    cap, row = 200, (1, 2, 16)
    kv = KVCache(("past_key_0",), ("new_key_0",), (np.zeros((NULL_ROWS + cap, *row), np.float32),))
    cache = kv.buffers[0]
    row_bytes = cache[0].nbytes
    device = FakeDevice(cache.nbytes)
    mirror = HostMirror()

    def step(n: int) -> int:
        before = device.uploaded
        window = kv.past()["past_key_0"]
        device.upload(mirror, window)
        slot = kv.slot(n)["new_key_0"]
        slot[...] = rng.standard_normal((n, *row)).astype(np.float32)  # what the engine computed, copied out
        device.absorb(mirror, slot)
        kv.advance(n)
        # The device copy equals the host cache over the window and everything written so far.
        seen = max(window.nbytes, cache[: NULL_ROWS + kv.pos].nbytes)
        assert np.array_equal(device.mem[:seen], cache.reshape(-1).view(np.uint8)[:seen])
        return device.uploaded - before

    assert step(9) == row_bytes  # prefill: only the null row
    # First decode step: the 64-row window's rows after the past (masked, but on the device too), once.
    assert step(1) == (WINDOW_STEP - 9) * row_bytes
    assert [step(1) for _ in range(WINDOW_STEP - 10)] == [0] * (WINDOW_STEP - 10)  # the past is already there
    assert kv.pos == WINDOW_STEP
    assert step(1) == 0  # the slot right behind the window extends it on the device
    assert step(1) == (WINDOW_STEP - 1) * row_bytes  # the window grows: its new rows, once
    assert step(1) == 0
    kv.rewind(3)  # a rewind: positions from 3 on are overwritten, nothing re-uploaded
    assert step(2) == 0 and step(1) == 0


def test_inputs_nothing_continues_are_uploaded_every_call():
    history = np.full((1, 5), -1, np.int64)
    m = HostMirror()
    for i in range(3):
        history[0, i] = 7 + i  # rewritten in place, same pointer
        assert m.upload(history.ctypes.data, history.nbytes) == (0, history.nbytes)


def test_mirror_bookkeeping():
    a = np.arange(100, dtype=np.float32)
    other = np.ones(100, np.float32)
    base = a.ctypes.data
    m = HostMirror()
    assert m.upload(base, 40) == (0, 40)
    assert m.absorb(base + 40, 40, a.nbytes) == 40  # continues the input: input and output trusted
    assert m.upload(base, 80) == (80, 0)
    assert m.absorb(base + 120, 4, a.nbytes) is None  # would leave a gap
    assert m.upload(base, 200) == (80, 120)  # only what is not on the device yet
    # An output over trusted bytes that cannot be mirrored (past the device buffer) makes them stale.
    assert m.absorb(base + 20, 12, 16) is None
    assert m.upload(base, 80) == (20, 60)
    assert m.upload(other.ctypes.data, 80) == (0, 80)  # another host array: all of it
    assert m.upload(base, 80) == (0, 80)  # and `a` is no longer mirrored


# --- the Engine on an engine set -----------------------------------------------------------


def test_engine_runs_the_plans_of_an_engine_set_and_checks_them_against_its_bundle(tmp_path):
    """Engine(backend="trt") opens each component's plan through its manifest entry, comparing the
    ONNX sha256 the plan was built from with this bundle's file; no engine set is a clear error."""
    from qinyu_edge.bundle import load_bundle
    from qinyu_edge.export.bundle_export import preset_bundle
    from qinyu_edge.runtime.engine import Engine, EngineOptions

    bundle = preset_bundle("tiny-8b")
    with pytest.raises(EngineError, match="--engines DIR.*qinyu-edge build --bundle"):
        Engine(bundle, EngineOptions(backend="trt"), verify=False)
    with pytest.raises(EngineError, match="trt backend"):
        Engine(bundle, EngineOptions(engines=str(tmp_path)), verify=False)
    with pytest.raises(EngineError, match="not an engine set"):
        Engine(bundle, EngineOptions(backend="trt", engines=str(tmp_path)), verify=False)

    data = plan_blob()
    root = tmp_path / "engines"
    root.mkdir()
    (root / "backbone.plan").write_bytes(data)
    # Built from another backbone.onnx than this bundle's: refused, naming the file and the rebuild.
    EngineSet(root, "orin-nano-8", "/data/bundle", {"backbone": entry_for(data)}).write()
    with pytest.raises(EngineError, match="backbone.onnx changed since the plan was built") as e:
        Engine(bundle, EngineOptions(backend="trt", engines=str(root)), verify=False)
    assert "rebuild it: qinyu-edge build" in str(e.value)
    # Built from this bundle's backbone: the plan passes its checks and TensorRT itself is next.
    sha = load_bundle(bundle, verify=False).files["backbone.onnx"].sha256
    EngineSet(root, "orin-nano-8", "/data/bundle", {"backbone": entry_for(data, onnx_sha256=sha)}).write()
    if not _has_tensorrt():
        with pytest.raises(TensorRTMissing):
            Engine(bundle, EngineOptions(backend="trt", engines=str(root)), verify=False)


class HostBuffer:
    """A stand-in allocation with a real address (a host array) and a freed flag."""

    def __init__(self, nbytes: int, log: list):
        self.mem = np.zeros(nbytes, np.uint8)
        self.ptr, self.nbytes, self.freed = self.mem.ctypes.data, nbytes, False
        log.append(self)

    def free(self) -> None:
        assert not self.freed, "freed twice"
        self.freed = True


class RecordingContext:
    """What SharedScratch asks of an execution context: where its memory is (TensorRT's own is GPU-only)."""

    def __init__(self):
        self.memory: tuple[int, int] | None = None

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)


def test_shared_scratch_grows_to_the_largest_need_and_repoints_every_context():
    allocations: list[HostBuffer] = []
    scratch = SharedScratch(lambda n: HostBuffer(n, allocations))
    small, large, mid = RecordingContext(), RecordingContext(), RecordingContext()
    scratch.attach(small, 1000)
    scratch.attach(large, 5000)
    scratch.attach(mid, 3000)
    # one live buffer of the largest need; the first was freed only after both were repointed
    assert [b.nbytes for b in allocations] == [1000, 5000] and allocations[0].freed and not allocations[1].freed
    live = (allocations[1].ptr, 5000)
    assert small.memory == large.memory == mid.memory == live
    assert scratch.nbytes == 5000 and scratch.separate_bytes == 9000
    scratch.detach(large)
    assert scratch.nbytes == 5000  # still in use by the others: never shrunk under them
    scratch.detach(small)
    scratch.detach(mid)
    assert scratch.nbytes == 0 and allocations[1].freed


def test_shared_scratch_serialises_its_users():
    import threading

    scratch = SharedScratch(lambda n: HostBuffer(n, []))
    inside, overlaps = [0], [0]

    def use():
        for _ in range(200):
            with scratch.lock:
                inside[0] += 1
                overlaps[0] = max(overlaps[0], inside[0])
                inside[0] -= 1

    threads = [threading.Thread(target=use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps[0] == 1
