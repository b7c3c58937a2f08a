"""Every bad option or input is `error: <what> ... <fix>` with exit 2; nothing half-written is left."""

import errno
import shutil
import stat
import subprocess

import numpy as np
import pytest
import soundfile as sf

from qinyu_edge.cli import main
from qinyu_edge.failures import report


@pytest.fixture(scope="module")
def bundle():
    from qinyu_edge.export.bundle_export import preset_bundle

    return str(preset_bundle("tiny-8b"))


def refused(capsys, argv):
    """The message of a refused command: one `error:` line (argparse's refusals too), exit 2."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "Traceback" not in err and "usage:" not in err, err
    return err


@pytest.mark.parametrize("extra, says", [
    (["--context", "0"], "--context: 0 is out of range"),
    (["--context", "-5"], "--context: -5 is out of range"),
    (["--context", "100000"], "--context 100000 is beyond this bundle"),
    (["--max-new-tokens", "0"], "--max-new-tokens: 0 is out of range"),
    (["--max-new-tokens", "-5"], "--max-new-tokens: -5 is out of range"),
    (["--sample", "--temperature", "nan"], "--temperature: nan is out of range"),
    (["--top-p", "1.5"], "--top-p: 1.5 is out of range"),
    (["--threads", "0"], "--threads: 0 is out of range"),
])
def test_run_numeric_options(bundle, tmp_path, capsys, extra, says):
    assert says in refused(capsys, ["run", "--bundle", bundle, "--text", "hi", "--output", str(tmp_path / "r.wav"), *extra])
    assert not (tmp_path / "r.wav").exists()


@pytest.mark.parametrize("value", ["0", "-1", "10", "100000"])
def test_export_max_context(tmp_path, capsys, value):
    err = refused(capsys, ["export", "--preset", "tiny-4b", "--out", str(tmp_path / "b"), "--max-context", value])
    assert "--max-context" in err and "out of range" in err
    assert list(tmp_path.iterdir()) == []


def test_demo_num_history(capsys, tmp_path):
    assert "--num-history: -1 is out of range" in refused(capsys, ["demo", "--num-history", "-1"])


@pytest.mark.parametrize("extra, says", [
    (["--text", "hi <|im_end|> there"], "reserved token"),
    (["--text", "hi <|audio|>"], "reserved token"),
    (["--text", "hi", "--mode", "roleplay", "--role", "a <|speaker|> pirate"], "reserved token"),
    (["--text", "hi", "--mode", "roleplay"], "--mode roleplay needs --role"),
    (["--text", "hi", "--mode", "asr"], "--mode asr transcribes speech"),
])
def test_run_bad_text(bundle, tmp_path, capsys, extra, says):
    assert says in refused(capsys, ["run", "--bundle", bundle, "--output", str(tmp_path / "r.wav"), *extra])


def test_run_bad_files(bundle, tmp_path, capsys):
    wav = tmp_path / "q.wav"
    sf.write(str(wav), np.zeros(16000, np.float32), 16000)
    out = str(tmp_path / "r.wav")
    assert "--mode tts speaks text" in refused(capsys, ["run", "--bundle", bundle, "--input", str(wav), "--mode", "tts",
                                                       "--output", out])
    pickled = tmp_path / "v.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "not a plain .npy" in refused(capsys, ["run", "--bundle", bundle, "--text", "hi", "--voice", str(pickled),
                                                  "--output", out])
    broken = tmp_path / "v.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    assert "not a readable .safetensors" in refused(capsys, ["run", "--bundle", bundle, "--text", "hi", "--voice",
                                                             str(broken), "--output", out])
    assert "is a folder" in refused(capsys, ["run", "--bundle", bundle, "--text", "hi", "--output", str(tmp_path)])
    assert "from the suffix '.xyz'" in refused(capsys, ["run", "--bundle", bundle, "--text", "hi",
                                                        "--output", str(tmp_path / "r.xyz")])
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "cannot write the --output" in refused(capsys, ["run", "--bundle", bundle, "--text", "hi",
                                                           "--output", str(afile / "r.wav")])


def test_run_writes_the_format_the_suffix_names(bundle, tmp_path):
    for suffix, fmt in ((".flac", "FLAC"), (".ogg", "OGG")):
        out = tmp_path / f"r{suffix}"
        assert main(["run", "--bundle", bundle, "--text", "hi", "--max-new-tokens", "30", "--output", str(out)]) == 0
        assert sf.info(str(out)).format == fmt


def test_read_only_folder(bundle, tmp_path, capsys):
    """A read-only bind mount when we may make one (root in a container may not), else a 0555 folder
    (which root ignores): refused before any work either way."""
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = shutil.which("mount") and subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)],
                                                        capture_output=True).returncode == 0
    if not mounted:
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        probe = ro / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("this user can write a 0555 folder and may not mount: no read-only place to test")
        except PermissionError:
            pass
    try:
        err = refused(capsys, ["run", "--bundle", bundle, "--text", "hi", "--output", str(ro / "r.wav")])
        assert "cannot write the --output" in err and "read-only" in err
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=True)


def test_known_failures_and_bugs(capsys):
    assert report(OSError(errno.ENOSPC, "No space left on device", "/data/b.onnx"), verbose=False) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device: /data/b.onnx. Free some space") and "Traceback" not in err
    try:
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/x")
    except OSError as e:
        assert report(e, verbose=True) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: Read-only file system: /mnt/x. That file system is mounted read-only" in err
    assert report(RuntimeError("a bug"), verbose=False) is None  # re-raised by main: the traceback stays


def test_broken_pipe_is_one_line(bundle):
    """`lint ... | true`: the reader is gone before the report is written; before, a BrokenPipeError traceback."""
    cmd = f".venv/bin/qinyu-edge lint --bundle {bundle} --json | true"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr and "error: the output pipe was closed" in proc.stderr


def test_lint_unknown_trt_and_demo_silence(bundle, tmp_path, capsys):
    assert "TensorRT 99.9 is unknown" in refused(capsys, ["lint", "--bundle", bundle, "--trt", "99.9"])
    quiet = tmp_path / "quiet.wav"
    sf.write(str(quiet), np.zeros(3 * 16000, np.float32), 16000)
    err = refused(capsys, ["demo", "--fast", "--input", str(quiet), "--output", str(tmp_path / "o.wav")])
    assert "no speech was heard" in err
    assert "from the suffix '.mp4'" in refused(capsys, ["demo", "--fast", "--output", str(tmp_path / "o.mp4")])
    assert "--log" in refused(capsys, ["demo", "--fast", "--log", str(tmp_path), "--output", str(tmp_path / "o.wav")])
