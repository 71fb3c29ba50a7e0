"""Simulated and replayed cameras inside a real UniMMCore: frames, rates, ROI and bad files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from acquisition.cameras import (
    FramePacer,
    MicroManagerConfigError,
    ReplayCamera,
    ReplayFileError,
    SimulatedCamera,
    load_replay_stack,
    make_core,
)
from acquisition.simulation import SimulationConfig

NUCLEUS = "real-emccd-nucleus-100f.tif"


def acquire(core, seconds: float | None = None, n: int | None = None,
            timeout: float = 10.0) -> tuple[list[np.ndarray], list[dict]]:
    """Run a sequence like the acquisition thread does; pop every frame with its metadata."""
    if n is None:
        core.startContinuousSequenceAcquisition(0)
    else:
        core.startSequenceAcquisition(n, 0, False)
    frames, metas = [], []
    t_end = time.monotonic() + (seconds if seconds is not None else timeout)
    while time.monotonic() < t_end:
        if core.getRemainingImageCount():
            img, md = core.popNextImageAndMD()
            frames.append(img)
            metas.append(dict(md))
        elif not core.isSequenceRunning():
            break
        else:
            time.sleep(0.0005)
    core.stopSequenceAcquisition()
    while core.getRemainingImageCount():
        img, md = core.popNextImageAndMD()
        frames.append(img)
        metas.append(dict(md))
    return frames, metas


def measured_fps(metas: list[dict]) -> float:
    t = [float(m["ElapsedTime-ms"]) for m in metas]
    return 1000.0 * (len(t) - 1) / (t[-1] - t[0])


# --------------------------------------------------------------------------- pacing
class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        assert dt > 0
        self.t += dt


def test_pacer_keeps_the_rate_whatever_each_frame_costs():
    clock = FakeClock()
    pacer = FramePacer(0.01, clock=clock, sleep=clock.sleep)
    t0 = clock.t
    work = [0.001, 0.009, 0.004, 0.0095, 0.0, 0.012, 0.002]  # one frame overruns a bit
    stamps = []
    for w in work * 10:
        clock.t += w  # rendering
        pacer.wait()
        stamps.append(clock.t)
    # deadlines k * period exactly, except the overrun frame which is late, not the rest
    expected = t0 + 0.01 * np.arange(1, len(stamps) + 1)
    late = np.array(stamps) - expected
    assert np.all(late >= -1e-12)
    assert np.sum(late > 1e-9) <= 10  # only the frames after each 12 ms render
    assert stamps[-1] == pytest.approx(expected[-1])  # no accumulated drift
    assert pacer.resyncs == 0


def test_pacer_restarts_after_a_stall_instead_of_bursting():
    clock = FakeClock()
    pacer = FramePacer(0.01, max_lag_frames=5, clock=clock, sleep=clock.sleep)
    pacer.wait()
    clock.t += 1.0  # a one-second stall
    pacer.wait()
    after_stall = clock.t
    pacer.wait()
    assert pacer.resyncs == 1
    assert clock.t == pytest.approx(after_stall + 0.01)  # the next frame one period later


def test_pacer_rate_change_applies_from_the_next_frame():
    clock = FakeClock()
    pacer = FramePacer(0.01, clock=clock, sleep=clock.sleep)
    pacer.wait()
    pacer.wait()
    t = clock.t
    pacer.set_period(0.02)
    pacer.wait()
    assert clock.t == pytest.approx(t + 0.02)


# --------------------------------------------------------------------------- simulated camera
def test_simulated_camera_streams_in_order_at_the_set_rate():
    core = make_core("sim", size=32, fps=100.0)
    frames, metas = acquire(core, seconds=0.6)
    numbers = [int(m["ImageNumber"]) for m in metas]
    assert numbers == list(range(len(frames)))
    assert all(f.dtype == np.uint16 and f.shape == (32, 32) for f in frames)
    fps = measured_fps(metas)
    print(f"simulated camera: {len(frames)} frames, {fps:.1f} fps (set 100)")
    assert fps == pytest.approx(100.0, rel=0.15)
    assert 40 <= len(frames) <= 70
    assert not np.array_equal(frames[0], frames[1])  # a live, blinking sample
    assert metas[0]["Camera"] == "SimCamera"
    assert core.getPixelSizeUm() == pytest.approx(0.1)


def test_simulated_camera_properties_drive_the_scene():
    core = make_core("sim", size=32, fps=100.0, camera="emccd", on_ms=20.0, seed=3)
    cam = core._py_camera()
    assert isinstance(cam, SimulatedCamera)
    assert cam.config.camera.kind == "emccd" and cam.config.on_ms == 20.0
    assert core.getProperty("SimCamera", "CameraModel") == "emccd"

    core.setProperty("SimCamera", "Size", 48)
    core.setProperty("SimCamera", "CameraModel", "ideal")
    core.setProperty("SimCamera", "Photons", 0.0)
    core.setProperty("SimCamera", "Background", 0.0)
    core.snapImage()
    img = core.getImage()
    assert img.shape == (48, 48)
    assert np.all(img == 100)  # ideal camera, no light: exactly the offset

    with pytest.raises(ValueError):
        core.setProperty("SimCamera", "CameraModel", "ccd")

    # exposure cannot exceed the frame period: a long exposure lowers the rate
    core.setProperty("SimCamera", "FPS", 200.0)
    assert core.getExposure() == pytest.approx(5.0, abs=0.01)
    core.setExposure(20.0)
    assert float(core.getProperty("SimCamera", "FPS")) == pytest.approx(50.0)


def test_simulated_camera_roi_crops_frames():
    core = make_core("sim", size=48, fps=200.0, crop=(4, 8, 24, 16))
    frames, metas = acquire(core, n=5)
    assert len(frames) == 5 and all(f.shape == (16, 24) for f in frames)
    assert metas[0]["ROI-X-start"] == "4" and metas[0]["ROI-Y-start"] == "8"


def test_make_core_rejects_unknown_sources(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        make_core(str(tmp_path / "movie.avi"))
    with pytest.raises(ValueError, match="unknown camera model"):
        make_core("sim", camera="ccd")


# --------------------------------------------------------------------------- replay
def write_movie(path: Path, n: int = 12, shape=(20, 24), fps: float | None = 50.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, size=(n, *shape), dtype=np.uint16)
    md = {"axes": "TYX", "unit": "um"}
    if fps:
        md["finterval"] = 1.0 / fps
    tifffile.imwrite(path, data, imagej=True, metadata=md, resolution=(1 / 0.13, 1 / 0.13))
    return data


def test_a_camera_without_a_pixel_size_does_not_inherit_the_previous_one(tmp_path):
    movie = np.zeros((5, 8, 8), np.uint16)
    tifffile.imwrite(tmp_path / "plain.tif", movie, photometric="minisblack")  # no pixel size
    core = make_core("sim", size=16)
    assert core.getPixelSizeUm() == pytest.approx(0.1)
    make_core(tmp_path / "plain.tif", mmcore=core)
    assert core.getPixelSizeUm() == 0.0  # unknown, not the simulator's 0.1


def test_replay_reads_rate_and_pixel_size_from_the_file(tmp_path):
    data = write_movie(tmp_path / "m.tif", fps=40.0)
    stack = load_replay_stack(tmp_path / "m.tif")
    assert stack.fps == pytest.approx(40.0) and stack.fps_source == "ImageJ finterval"
    assert stack.pixel_size_um == pytest.approx(0.13, rel=1e-3)
    np.testing.assert_array_equal(stack.frames, data)


def test_replay_once_plays_every_frame_then_stops(tmp_path):
    data = write_movie(tmp_path / "m.tif", n=12, fps=100.0)
    core = make_core(tmp_path / "m.tif", fps=None, loop=False)
    assert core.getPixelSizeUm() == pytest.approx(0.13, rel=1e-3)
    frames, metas = acquire(core, timeout=10.0)
    assert len(frames) == 12
    np.testing.assert_array_equal(np.stack(frames), data)
    assert core._py_camera().sequence_end == "end of source"
    fps = measured_fps(metas)
    print(f"replay at recorded rate: {fps:.0f} fps (file says 100)")
    assert fps == pytest.approx(100.0, rel=0.2)


def test_replay_loop_wraps_around(tmp_path):
    data = write_movie(tmp_path / "m.tif", n=5)
    core = make_core(tmp_path / "m.tif", fps=500.0, loop=True)
    frames, _ = acquire(core, n=13)
    assert len(frames) == 13
    np.testing.assert_array_equal(np.stack(frames), data[np.arange(13) % 5])


def test_replay_of_the_shared_movie_plays_all_frames_cropped(shared_data):
    path = shared_data / NUCLEUS
    truth = tifffile.imread(path)
    cam = ReplayCamera(path)
    assert cam.stack.fps == pytest.approx(85.1, rel=0.01)  # from the NIS-Elements timestamps
    assert cam.pixel_size_um == pytest.approx(0.16)
    core = make_core(path, fps=1000.0, loop=False, crop=(10, 20, 64, 48))
    assert core.getPixelSizeUm() == pytest.approx(0.16)  # the core reports the file's pixel size
    frames, metas = acquire(core, timeout=20.0)
    assert len(frames) == truth.shape[0] == 100
    np.testing.assert_array_equal(np.stack(frames), truth[:, 20:68, 10:74])
    print(f"shared movie replayed at {measured_fps(metas):.0f} fps (set 1000)")


def test_replay_shared_movie_at_recorded_rate(shared_data):
    core = make_core(shared_data / NUCLEUS, fps=None, loop=True)
    frames, metas = acquire(core, seconds=0.5)
    fps = measured_fps(metas)
    print(f"shared movie at its recorded rate: {fps:.1f} fps (file: 85.1)")
    assert fps == pytest.approx(85.1, rel=0.15)
    assert [int(m["ReplayFrame"]) for m in metas] == list(range(len(frames)))


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated", "directory",
                                  "rgb", "4d", "float"])
def test_bad_replay_file_raises_one_clear_error(tmp_path, kind):
    path = tmp_path / f"{kind}.tif"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("frame,value\n1,2\n")
    elif kind == "truncated":
        write_movie(tmp_path / "good.tif", n=30)
        blob = (tmp_path / "good.tif").read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "rgb":
        tifffile.imwrite(path, np.zeros((4, 16, 16, 3), np.uint8), photometric="rgb")
    elif kind == "4d":
        tifffile.imwrite(path, np.zeros((3, 2, 16, 16), np.uint16), photometric="minisblack")
    elif kind == "float":
        tifffile.imwrite(path, np.zeros((3, 16, 16), np.float32), photometric="minisblack")
    with pytest.raises(ReplayFileError) as info:
        make_core(path, loop=False)
    msg = str(info.value)
    assert str(path) in msg
    expected = {"missing": "not found", "empty": "empty", "text": "not a readable TIFF",
                "truncated": "truncated", "directory": "directory", "rgb": "colour",
                "4d": "wrong dimensions", "float": "unsupported pixel type"}[kind]
    assert expected in msg
    assert isinstance(info.value, ValueError)


def test_replay_crop_outside_the_frame_is_refused(tmp_path):
    write_movie(tmp_path / "m.tif", shape=(20, 24))
    with pytest.raises(ValueError, match="exceeds sensor bounds"):
        ReplayCamera(tmp_path / "m.tif", crop=(10, 10, 20, 20))


# --------------------------------------------------------------------------- .cfg
def test_cfg_source_errors_are_clear(tmp_path):
    with pytest.raises(MicroManagerConfigError, match="not found"):
        make_core(tmp_path / "missing.cfg")
    from pymmcore_plus import find_micromanager

    cfg = tmp_path / "scope.cfg"
    cfg.write_text("Device,Camera,DemoCamera,DCam\n")
    if find_micromanager() is None:
        with pytest.raises(MicroManagerConfigError, match="mmcore install"):
            make_core(cfg)
    else:  # pragma: no cover - only where Micro-Manager is installed
        bad = tmp_path / "bad.cfg"
        bad.write_text("this is not a config\n")
        with pytest.raises(MicroManagerConfigError):
            make_core(bad)


def test_simulated_camera_uses_the_given_config():
    cam = SimulatedCamera(SimulationConfig(size=16, fps=50.0, off_ms=300.0))
    assert cam.sensor_shape() == (16, 16)
    assert cam.frame_period_s() == pytest.approx(0.02)
    assert cam.get_property_value("OffTime-ms") == 300.0


def test_an_integer_crop_is_a_centred_square():
    core = make_core("sim", size=40, fps=200.0, crop=16)
    assert core.getROI() == [12, 12, 16, 16]
    with pytest.raises(ValueError, match="does not fit"):
        make_core("sim", size=40, crop=64)


def test_settings_changed_during_a_sequence_apply_live_but_size_waits():
    core = make_core("sim", size=24, fps=200.0)
    core.startContinuousSequenceAcquisition(0)
    try:
        time.sleep(0.05)
        core.setProperty("SimCamera", "Size", 40)  # buffer shape is fixed for this sequence
        for name, value in (("CameraModel", "ideal"), ("Photons", 0.0), ("Background", 0.0)):
            core.setProperty("SimCamera", name, value)
        time.sleep(0.1)
    finally:
        core.stopSequenceAcquisition()
    frames = []
    while core.getRemainingImageCount():
        frames.append(core.popNextImageAndMD()[0])
    assert len(frames) >= 10 and all(f.shape == (24, 24) for f in frames)
    assert np.all(frames[-1] == 100)  # the dark, noiseless camera is live
    frames2, _ = acquire(core, n=3)
    assert all(f.shape == (40, 40) for f in frames2)  # the new size from the next sequence


def test_snaps_step_through_a_replay_and_wrap(tmp_path):
    data = write_movie(tmp_path / "m.tif", n=3)
    core = make_core(tmp_path / "m.tif", fps=1000.0, loop=False)
    shots = []
    for _ in range(4):
        core.snapImage()
        shots.append(core.getImage().copy())
    np.testing.assert_array_equal(np.stack(shots), data[[0, 1, 2, 0]])


def test_a_failing_snap_raises_to_the_caller():
    class Broken(SimulatedCamera):
        def next_image(self, buffer):
            raise OSError("sensor unplugged")

    from pymmcore_plus.experimental.unicore import UniMMCore

    core = UniMMCore()
    core.loadPyDevice("Broken", Broken(SimulationConfig(size=8)))
    core.initializeDevice("Broken")
    core.setCameraDevice("Broken")
    with pytest.raises(OSError, match="sensor unplugged"):
        core.snapImage()
