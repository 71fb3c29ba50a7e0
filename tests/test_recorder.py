"""The recording sink: OME-TIFF and OME-Zarr, lossless, with the acquisition metadata, complete
after close, readable after Ctrl-C or a crash, and a valid file of every frame written when
the disk fills up (a file-size limit in a subprocess; a real small tmpfs where mounting is
allowed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from acquisition.recorder import Recorder, RecorderError, recording_format
from acquisition.sinks import FrameMeta, StreamInfo

REPO = Path(__file__).resolve().parents[1]
INFO = StreamInfo(shape=(24, 20), dtype="uint16", camera="SimCamera", exposure_ms=10.0,
                  pixel_size_um=0.1, frame_interval_s=0.01, name="demo",
                  settings={"engine": "sofi", "window": 20})


def frames(n: int, shape=(24, 20), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 65535, size=(n, *shape), dtype=np.uint16)


def meta(i: int, seq: int | None = None) -> FrameMeta:
    return FrameMeta(seq=i if seq is None else seq, frame=i, t_acq_ns=1_000_000_000 + i * 10_000_000,
                     exposure_ms=10.0, camera="SimCamera")


def record(path: Path, data: np.ndarray, info: StreamInfo = INFO) -> Recorder:
    rec = Recorder(path)
    rec.setup(info)
    for i, f in enumerate(data):
        rec.append(f, meta(i))
    rec.close()
    return rec


def test_format_follows_the_file_name():
    assert recording_format("a/x.ome.tif") == recording_format("x.TIFF") == "ome-tiff"
    assert recording_format("x.ome.zarr") == recording_format("x.zarr/") == "ome-zarr"
    with pytest.raises(ValueError, match="name it"):
        recording_format("x.h5")


def test_ome_tiff_round_trip_is_lossless_with_the_acquisition_metadata(tmp_path):
    data = frames(50)
    path = tmp_path / "r.ome.tif"
    rec = record(path, data)
    assert rec.frames_recorded == 50 and rec.backlog == 0
    assert rec.summary_line() == f"recording written to {path} (50 frames)"
    np.testing.assert_array_equal(tifffile.imread(path), data)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome and tf.is_bigtiff
        assert len(tf.series) == 1 and tf.series[0].axes == "TYX"
        xml = tf.ome_metadata
        xres = tf.pages.first.tags["XResolution"].value
    assert 'SizeT="50"' in xml and 'PhysicalSizeX="0.1"' in xml and 'PhysicalSizeY="0.1"' in xml
    assert 'TimeIncrement="0.01"' in xml and 'DeltaT="0.49"' in xml
    assert 'ExposureTime="10.0" ExposureTimeUnit="ms"' in xml
    assert '<M K="camera">SimCamera</M>' in xml and '<M K="engine">sofi</M>' in xml
    assert '<M K="missing_seq">none</M>' in xml
    assert xres[0] / xres[1] == pytest.approx(10.0)  # TIFF resolution: 10 pixels per um


def test_ome_zarr_round_trip_is_lossless_with_the_acquisition_metadata(tmp_path):
    data = frames(50)
    path = tmp_path / "r.ome.zarr"
    rec = record(path, data)
    assert rec.frames_recorded == 50
    group = zarr.open_group(str(path), mode="r")
    np.testing.assert_array_equal(group["0"][:], data)
    ms = group.attrs["ome"]
    assert ms["version"] == "0.5"
    scale = ms["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == pytest.approx([0.01, 0.1, 0.1])  # t (s), y, x (um)
    livesr = group.attrs["livesr"]
    assert livesr["camera"] == "SimCamera" and livesr["exposure_ms"] == 10.0
    assert livesr["engine"] == "sofi" and livesr["frames_recorded"] == 50
    assert livesr["frame_interval_s_measured"] == pytest.approx(0.01)
    per_frame = group.attrs["ome_writers"]["frame_metadata"]
    assert per_frame[49]["delta_t"] == pytest.approx(0.49)
    assert per_frame[0]["exposure_time"] == pytest.approx(0.01)


def test_tiff_keeps_sequence_gaps_and_shape_changes_zarr_refuses_a_shape_change(tmp_path):
    a, b = frames(5), frames(3, shape=(8, 8), seed=1)
    path = tmp_path / "r.ome.tif"
    rec = Recorder(path)
    rec.setup(INFO)
    for i, (seq, f) in enumerate(zip([0, 1, 2, 6, 7, 8, 9, 10], [*a, *b])):
        rec.append(f, meta(i, seq))
    rec.close()
    with tifffile.TiffFile(path) as tf:
        assert [s.shape for s in tf.series] == [(5, 24, 20), (3, 8, 8)]
        np.testing.assert_array_equal(tf.series[0].asarray(), a)
        np.testing.assert_array_equal(tf.series[1].asarray(), b)
        assert re.search(r'<M K="missing_seq">3-5</M>', tf.ome_metadata)

    zpath = tmp_path / "r.ome.zarr"
    rec = Recorder(zpath)
    rec.setup(INFO)
    for i, f in enumerate([*a, *b]):
        rec.append(f, meta(i))
    with pytest.raises(RecorderError, match=r"frame 5 .*8x8.*record to \.ome\.tif"):
        rec.close()
    assert zarr.open_group(str(zpath), mode="r")["0"].shape == (5, 24, 20)


def test_bad_use_is_refused_clearly(tmp_path):
    path = tmp_path / "r.ome.tif"
    rec = Recorder(path)
    with pytest.raises(RecorderError, match="not set up"):
        rec.append(np.ones((4, 4), np.uint16), meta(0))
    rec.setup(INFO)
    with pytest.raises(RecorderError, match="2-D"):
        rec.append(np.zeros((2, 3, 4), np.uint16), meta(0))
    rec.append(np.ones((4, 4), np.uint16), meta(0))
    rec.close()
    rec.close()  # idempotent
    with pytest.raises(RecorderError, match="closed"):
        rec.append(np.ones((4, 4), np.uint16), meta(1))
    with pytest.raises(FileExistsError):
        Recorder(path)
    with pytest.raises(ValueError, match="recording format"):
        Recorder(tmp_path / "x.h5")
    r2 = Recorder(path, overwrite=True)
    r2.setup(INFO)
    r2.close()


def test_a_recording_without_frames_says_so_and_leaves_no_broken_file(tmp_path):
    rec = Recorder(tmp_path / "empty.ome.tif")
    rec.setup(INFO)
    rec.close()
    assert not (tmp_path / "empty.ome.tif").exists() and rec.frames_recorded == 0
    assert "not written" in rec.summary_line()
    never = Recorder(tmp_path / "never.ome.zarr")
    never.close()
    assert "not written" in never.summary_line() and not (tmp_path / "never.ome.zarr").exists()


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_append_never_waits_for_the_disk(tmp_path, suffix):
    data = frames(300, shape=(64, 64))
    path = tmp_path / f"r{suffix}"
    rec = Recorder(path)
    rec.setup(StreamInfo(shape=(64, 64), dtype="uint16"))
    t = time.perf_counter()
    for i, f in enumerate(data):
        rec.append(f, meta(i))
    put_s = time.perf_counter() - t
    rec.close()
    print(f"{suffix}: {300 / put_s:.0f} frames/s handed over; all {rec.frames_recorded} written")
    assert rec.frames_recorded == 300
    back = tifffile.imread(path) if suffix == ".ome.tif" else zarr.open_array(str(path / "0"))[:]
    np.testing.assert_array_equal(back, data)


def run_child(code: str, **fmt: object) -> subprocess.CompletedProcess:
    script = textwrap.dedent(code).format(**{k: repr(str(v)) for k, v in fmt.items()})
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


_CHILD_RECORDER = """
    import numpy as np
    from acquisition.recorder import Recorder
    from acquisition.sinks import FrameMeta, StreamInfo
    rec = Recorder({path})
    rec.setup(StreamInfo(shape=(64, 64), dtype="uint16", camera="cam", pixel_size_um=0.1))
    def put(i):
        rec.append(np.full((64, 64), i + 1, np.uint16),
                   FrameMeta(seq=i, frame=i, t_acq_ns=10**9 + i * 10**7, exposure_ms=5.0))
"""


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_file_is_complete_after_ctrl_c(tmp_path, suffix):
    """KeyboardInterrupt without an explicit close: atexit finishes the file."""
    path = tmp_path / f"ctrlc{suffix}"
    proc = run_child(_CHILD_RECORDER + """
    for i in range(30):
        put(i)
    raise KeyboardInterrupt
    """, path=path)
    assert "KeyboardInterrupt" in proc.stderr
    data = _read(path)
    assert data.shape == (30, 64, 64)
    np.testing.assert_array_equal(data[:, 0, 0], np.arange(1, 31))


def test_tiff_frames_written_before_a_hard_crash_stay_readable(tmp_path):
    """A process killed outright (no atexit) still leaves a valid multi-page TIFF."""
    path = tmp_path / "crash.ome.tif"
    proc = run_child(_CHILD_RECORDER + """
    import os, time
    for i in range(20):
        put(i)
    while rec.frames_recorded < 20:
        time.sleep(0.01)
    os._exit(9)
    """, path=path)
    assert proc.returncode == 9
    data = tifffile.imread(path)
    assert data.shape == (20, 64, 64)
    np.testing.assert_array_equal(data[:, 0, 0], np.arange(1, 21))


def _read(path: Path) -> np.ndarray:
    if path.suffix == ".zarr":
        return zarr.open_group(str(path), mode="r")["0"][:]
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome, "not an OME-TIFF"
        return tf.asarray()


_FILL_THE_DISK = _CHILD_RECORDER + """
    import resource, sys
    limit = int({limit})
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    lines = []
    rec.failed.connect(lines.append)
    for i in range(400):
        put(i)
    try:
        rec.close()
    except Exception as e:
        print("CLOSE", e)
    print("LINES", len(lines))
    print("LINE", lines[0] if lines else "")
    print("RECORDED", rec.frames_recorded, "NOT", rec.frames_not_recorded)
"""


def _check_full_disk_result(proc: subprocess.CompletedProcess, path: Path) -> int:
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LINES 1" in out  # one line, once
    line = re.search(r"LINE (.*)", out).group(1)
    m = re.match(r"recording stopped at frame (\d+) \(([^)]+)\): .* holds the first (\d+) frames "
                 r"\(0-(\d+)\)", line)
    assert m, line
    saved = int(m.group(3))
    recorded, not_recorded = map(int, re.search(r"RECORDED (\d+) NOT (\d+)", out).groups())
    assert recorded == saved and recorded + not_recorded == 400 and 0 < saved < 400
    assert int(m.group(1)) >= saved  # the failing frame is not among the saved ones
    data = _read(path)  # a valid OME file ...
    assert data.shape == (saved, 64, 64)  # ... of every frame written, in order
    np.testing.assert_array_equal(data[:, 0, 0], np.arange(1, saved + 1))
    return saved


def test_a_file_size_limit_leaves_a_valid_ome_tiff_of_every_frame_written(tmp_path):
    """RLIMIT_FSIZE in a child process: writes beyond 900 kB fail as on a full disk."""
    path = tmp_path / "limited.ome.tif"
    proc = run_child(_FILL_THE_DISK, path=path, limit=900_000)
    saved = _check_full_disk_result(proc, path)
    with tifffile.TiffFile(path) as tf:
        xml = tf.ome_metadata
    assert f'SizeT="{saved}"' in xml and 'PhysicalSizeX="0.1"' in xml
    assert "write failed at frame" in xml  # the file says why it ends there
    print(f"file-size limit: {saved} frames kept, {proc.stdout.splitlines()[1]}")


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_a_full_disk_leaves_a_valid_ome_file_of_every_frame_written(small_tmpfs, suffix):
    path = small_tmpfs / f"x{suffix}"
    proc = run_child(_FILL_THE_DISK, path=path, limit=0)
    saved = _check_full_disk_result(proc, path)
    assert "No space left on device" in proc.stdout or "short write" in proc.stdout
    if suffix == ".ome.zarr":
        livesr = zarr.open_group(str(path), mode="r").attrs["livesr"]
        assert livesr["frames_saved"] == saved and "write failed at frame" in livesr["stopped"]
    assert not any(p.name.endswith(".livesr-reserve") for p in small_tmpfs.iterdir())
    print(f"{suffix} on a full 1 MiB tmpfs: {saved} frames kept; " + json.dumps(proc.stdout))


@pytest.mark.parametrize("suffix", [".ome.tif", ".ome.zarr"])
def test_frame_times_come_from_the_source_clock_not_the_arrival_time(tmp_path, suffix):
    """An MDA listener gets frames in bursts from a relay thread: the recording's times must
    follow the camera/runner clock (elapsed_ms), 10 ms apart here, not the bursty arrival."""
    path = tmp_path / f"burst{suffix}"
    rec = Recorder(path)
    rec.setup(StreamInfo(shape=(8, 8), dtype="uint16"))
    for i in range(20):
        arrival = 5_000_000_000 + (i // 5) * 50_000_000  # 5 frames at once, every 50 ms
        rec.append(np.full((8, 8), i + 1, np.uint16),
                   FrameMeta(seq=i, frame=i, t_acq_ns=arrival, elapsed_ms=1000.0 + 10.0 * i))
    rec.close()
    if suffix == ".ome.tif":
        with tifffile.TiffFile(path) as tf:
            xml = tf.ome_metadata
        assert 'TimeIncrement="0.01"' in xml and 'DeltaT="0.19"' in xml
    else:
        g = zarr.open_group(str(path), mode="r")
        assert g.attrs["livesr"]["frame_interval_s_measured"] == pytest.approx(0.01)
        assert g.attrs["ome_writers"]["frame_metadata"][19]["delta_t"] == pytest.approx(0.19)
