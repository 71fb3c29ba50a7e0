"""OME-TIFF recorder: lossless, complete after close, readable after Ctrl-C or a crash."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquisition.recorder import OmeTiffRecorder, RecorderError

REPO = Path(__file__).resolve().parents[1]


def frames(n: int, shape=(24, 20), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 65535, size=(n, *shape), dtype=np.uint16)


def test_round_trip_is_lossless_with_ome_metadata(tmp_path):
    data = frames(50)
    path = tmp_path / "r.ome.tif"
    rec = OmeTiffRecorder(path, metadata={"pixel_size_um": 0.1, "fps": 100.0, "name": "demo"})
    for i, f in enumerate(data):
        rec.put(f, seq=i, t_ns=1_000_000_000 + i * 10_000_000)
    rec.close()
    assert rec.frames_recorded == 50 and rec.backlog == 0
    np.testing.assert_array_equal(tifffile.imread(path), data)
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome and tf.is_bigtiff
        assert len(tf.series) == 1 and tf.series[0].axes == "TYX"
        xml = tf.ome_metadata
    assert 'SizeT="50"' in xml and 'PhysicalSizeX="0.1"' in xml and 'TimeIncrement="0.01"' in xml
    assert 'DeltaT="0.49"' in xml  # per-frame timestamps from t_ns
    assert '<M K="missing_seq">none</M>' in xml


def test_sequence_gaps_and_shape_changes_are_kept_not_refused(tmp_path):
    a, b = frames(5), frames(3, shape=(8, 8), seed=1)
    path = tmp_path / "r.ome.tif"
    with OmeTiffRecorder(path) as rec:
        for seq, f in zip([0, 1, 2, 6, 7], a):
            rec.put(f, seq=seq)
        for seq, f in zip([8, 9, 10], b):
            rec.put(f, seq=seq)
    with tifffile.TiffFile(path) as tf:
        assert [s.shape for s in tf.series] == [(5, 24, 20), (3, 8, 8)]
        np.testing.assert_array_equal(tf.series[0].asarray(), a)
        np.testing.assert_array_equal(tf.series[1].asarray(), b)
        assert re.search(r'<M K="missing_seq">3-5</M>', tf.ome_metadata)


def test_bad_use_is_refused_clearly(tmp_path):
    path = tmp_path / "r.ome.tif"
    rec = OmeTiffRecorder(path)
    with pytest.raises(RecorderError, match="2-D"):
        rec.put(np.zeros((2, 3, 4), np.uint16))
    rec.put(np.ones((4, 4), np.uint16))
    rec.close()
    rec.close()  # idempotent
    with pytest.raises(RecorderError, match="closed"):
        rec.put(np.ones((4, 4), np.uint16))
    with pytest.raises(FileExistsError):
        OmeTiffRecorder(path)
    OmeTiffRecorder(path, overwrite=True).close()


def test_a_recording_without_frames_leaves_no_broken_file(tmp_path):
    rec = OmeTiffRecorder(tmp_path / "empty.ome.tif")
    rec.close()
    assert not (tmp_path / "empty.ome.tif").exists() and rec.frames_recorded == 0


def test_put_never_waits_for_the_disk(tmp_path):
    data = frames(400, shape=(64, 64))
    rec = OmeTiffRecorder(tmp_path / "r.ome.tif")
    import time

    t = time.perf_counter()
    for i, f in enumerate(data):
        rec.put(f, seq=i)
    put_s = time.perf_counter() - t
    rec.close()
    print(f"put: {400 / put_s:.0f} frames/s handed over; all {rec.frames_recorded} written")
    assert rec.frames_recorded == 400
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "r.ome.tif"), data)


def run_child(code: str, path: Path) -> subprocess.CompletedProcess:
    script = textwrap.dedent(code).format(path=str(path))
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_file_is_complete_after_ctrl_c(tmp_path):
    """KeyboardInterrupt without an explicit close: atexit finishes the OME-TIFF."""
    path = tmp_path / "ctrlc.ome.tif"
    proc = run_child("""
        import numpy as np
        from acquisition.recorder import OmeTiffRecorder
        rec = OmeTiffRecorder({path!r}, metadata={{"pixel_size_um": 0.1}})
        for i in range(30):
            rec.put(np.full((16, 16), i, np.uint16), seq=i)
        raise KeyboardInterrupt
    """, path)
    assert "KeyboardInterrupt" in proc.stderr
    with tifffile.TiffFile(path) as tf:
        assert tf.is_ome and tf.series[0].shape == (30, 16, 16)
        np.testing.assert_array_equal(tf.series[0].asarray()[:, 0, 0], np.arange(30))


def test_frames_written_before_a_hard_crash_stay_readable(tmp_path):
    """A process killed outright (no atexit) still leaves a valid multi-page TIFF."""
    path = tmp_path / "crash.ome.tif"
    proc = run_child("""
        import os, time
        import numpy as np
        from acquisition.recorder import OmeTiffRecorder
        rec = OmeTiffRecorder({path!r})
        for i in range(20):
            rec.put(np.full((16, 16), i, np.uint16), seq=i)
        while rec.frames_recorded < 20:
            time.sleep(0.01)
        time.sleep(0.2)  # the writer flushes once its queue is empty
        os._exit(9)
    """, path)
    assert proc.returncode == 9
    data = tifffile.imread(path)
    assert data.shape == (20, 16, 16)
    np.testing.assert_array_equal(data[:, 0, 0], np.arange(20))
