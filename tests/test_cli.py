"""``livesr`` CLI: flag mapping, clear errors for absurd values, pass-through, a headless run."""

from __future__ import annotations

import json
import sys
import types

import pytest
import tifffile

from realtime import cli
from realtime.cli import main, parse_config
from realtime.config import PipelineConfig

FREE = ["--frames-addr", "tcp://127.0.0.1:0", "--results-addr", "tcp://127.0.0.1:0"]


def parse(*argv):
    return parse_config(list(argv))


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--fps", "-5"], "fps must be > 0"),
        (["demo", "--fps", "nan"], "fps must be > 0 (and sane), got nan"),
        (["demo", "--size", "0"], "size must be an integer >= 4"),
        (["demo", "--size", "ten"], "Invalid value for '--size'"),
        (["demo", "--seconds", "-1"], "seconds must be >= 0"),
        (["demo", "--window", "1"], "window must be an integer >= 2"),
        (["demo", "--stride", "0"], "stride must be an integer >= 1"),
        (["demo", "--threads", "0"], "threads must be an integer >= 1"),
        (["replay", "x.tif", "--crop", "2"], "crop must be an integer >= 4"),
        (["replay", "x.tif", "--crop", "1,2,3"], "crop X,Y,W,H"),
        (["replay", "x.tif", "--loop", "--once"], "not allowed with"),
        (["live"], "--config"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["demo", "--record", "x.h5"], "name it *.ome.tif (OME-TIFF) or *.ome.zarr"),
        (["demo", "--save-sr", "sr.png"], "cannot tell the recording format"),
        (["demo", "--on-recording-failure", "ignore"], "recording_failure must be 'stop' or 'continue'"),
        (["mda", "no-such-sequence.yaml"], "no such MDA sequence file"),
    ],
)
def test_absurd_values_are_clear_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_missing_movie_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["replay", str(tmp_path / "nope.tif"), "--headless"])
    assert exc.value.code == 2 and "no such movie file" in capsys.readouterr().err


def test_demo_flags_map_onto_config(tmp_path):
    cfg = parse("demo", "--headless", "--seconds", "20", "--size", "128", "--fps", "50", "--engine", "convgru",
                "--record", str(tmp_path / "r.ome.tif"), "--json", str(tmp_path / "m.json"), "--window", "10",
                "--stride", "2", "--backend", "compiled", "--device", "cuda", "--crop", "64")
    assert (cfg.source, cfg.size, cfg.fps, cfg.seconds, cfg.engine) == ("sim", 128, 50.0, 20.0, "convgru")
    assert (cfg.window, cfg.stride, cfg.backend, cfg.device, cfg.crop) == (10, 2, "compiled", "cuda", 64)
    assert cfg.record == tmp_path / "r.ome.tif" and cfg.json == tmp_path / "m.json" and cfg.headless
    assert cfg.engine_spec().window == 10


def test_defaults():
    demo = parse("demo", "--headless")
    assert demo.seconds == cli.DEMO_HEADLESS_SECONDS and demo.fps == 100.0 and demo.engine == "sofi"
    assert demo.addresses.frames.startswith("tcp://127.0.0.1:")
    gui = parse("demo")
    assert gui.seconds is None  # a GUI runs until closed
    replay = parse("replay", "movie.tif", "--headless", "--crop", "1,2,30,40")
    assert replay.seconds is None and replay.loop is False and replay.fps is None  # whole movie, own rate
    assert replay.roi == (1, 2, 30, 40) and replay.source == "movie.tif"
    looped = parse("replay", "movie.tif", "--headless", "--loop")
    assert looped.loop and looped.seconds == cli.DEMO_HEADLESS_SECONDS
    live = parse("live", "--config", "scope.cfg", "--headless")
    assert live.source == "scope.cfg" and live.source_kind == "mm"


def test_mda_and_recording_flags_map_onto_config(tmp_path):
    seq = tmp_path / "s.yaml"
    seq.write_text("time_plan: {interval: 0, loops: 5}\n")
    cfg = parse("mda", str(seq), "--config", "scope.cfg", "--headless", "--engine", "convlstm",
                "--record", str(tmp_path / "r.ome.zarr"), "--save-sr", str(tmp_path / "sr.ome.tif"),
                "--on-recording-failure", "continue")
    assert (cfg.mode, cfg.sequence, cfg.source, cfg.engine) == ("mda", seq, "scope.cfg", "convlstm")
    assert cfg.seconds is None and cfg.fps is None  # until the sequence ends, at its pace
    assert cfg.record == tmp_path / "r.ome.zarr" and cfg.save_sr == tmp_path / "sr.ome.tif"
    assert cfg.recording_failure == "continue"
    sim = parse("mda", str(seq), "--headless")
    assert sim.source == "sim" and sim.mode == "mda" and sim.recording_failure == "stop"
    assert parse("demo").mode == "live" and parse("demo").save_sr is None


def test_tool_command_hands_its_flags_to_its_module(monkeypatch):
    seen = {}
    fake = types.ModuleType("engines.training")
    fake.config_from_flags = lambda flags: seen.setdefault("flags", flags)
    fake.run_cli = lambda cfg: 3
    monkeypatch.setitem(sys.modules, "engines.training", fake)
    assert main(["train", "--steps", "5", "--model", "convlstm"]) == 3
    assert seen["flags"]["steps"] == 5 and seen["flags"]["model"] == "convlstm"
    assert seen["flags"]["preset"] == "cpu" and seen["flags"]["lr"] is None


def test_tool_command_with_missing_module_is_a_clear_error(monkeypatch, capsys):
    from realtime import cli_tools

    monkeypatch.setitem(cli_tools.TOOL_MODULES, "keys", "livesr_no_such_module.security")
    assert main(["keys", "--out", "k", "--name", "x"]) == 2
    assert "livesr keys: not available in this install (livesr_no_such_module.security is missing)" \
        in capsys.readouterr().err


def test_tool_command_with_a_module_that_fails_to_import_is_a_clear_error(monkeypatch, capsys, tmp_path):
    from realtime import cli_tools

    (tmp_path / "livesr_broken_keys.py").write_text("raise ImportError('libsodium.so: cannot open')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli_tools.TOOL_MODULES, "keys", "livesr_broken_keys")
    assert main(["keys", "--out", "k", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert "livesr keys: not available" in err and "importing livesr_broken_keys failed" in err
    assert "libsodium.so" in err and len(err.strip().splitlines()) == 1


def test_gui_is_used_when_available(monkeypatch):
    got = {}
    fake = types.ModuleType("gui.app")
    fake.run_gui = lambda config, seconds=None: got.update(config=config, seconds=seconds) or 0
    monkeypatch.setitem(sys.modules, "gui.app", fake)
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    assert main(["demo", "--size", "64", "--seconds", "3"]) == 0
    assert got["config"].size == 64 and not got["config"].headless and got["seconds"] == 3.0


def test_no_display_falls_back_to_headless(monkeypatch):
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert "no display" in cli._gui_problem()


def test_headless_demo_run_writes_summary_json_and_recording(tmp_path, capsys):
    rec, js = tmp_path / "out.ome.tif", tmp_path / "m.json"
    rc = main(["demo", "--headless", "--seconds", "1", "--size", "32", "--worker", "thread", "--threads", "1",
               "--window", "4", "--record", str(rec), "--json", str(js), *FREE])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "frames acquired" in out and "latency ms" in out
    d = json.loads(js.read_text())
    assert d["engine"] == "sofi" and d["frames_acquired"] > 30 and d["errors"] == []
    assert d["frames_recorded"] == d["frames_acquired"] == tifffile.imread(rec).shape[0]
    assert d["outputs"] + d["outputs_skipped"] == d["frames_acquired"] - 4 + 1


# ----------------------------------------------------------------------------- SOFI flags
def test_sofi_flags_map_onto_config_and_engine_options():
    cfg = parse("replay", "x.tif", "--na", "1.3", "--wavelength-nm", "603", "--pixel-size-um", "0.16",
                "--lag", "1", "--bleach-order", "1")
    s = cfg.sofi
    assert (s.na, s.wavelength_nm, s.pixel_size_um, s.lag, s.bleach_order) == (1.3, 603.0, 0.16, 1, 1)
    opts = cfg.engine_spec(0.2, "from core pixel-size config").options
    assert opts["optics"] == {"na": 1.3, "wavelength_nm": 603.0, "pixel_size_um": 0.16,
                              "pixel_size_source": "--pixel-size-um"}  # the flag overrides the camera
    assert opts["lag"] == 1 and opts["bleach_order"] == 1
    d = parse("demo")
    assert d.sofi.lag == "auto" and d.sofi.bleach_order == 2
    assert d.engine_spec(0.2, "from core pixel-size config").options["optics"] == {
        "pixel_size_um": 0.2, "pixel_size_source": "from core pixel-size config"}
    assert parse("demo", "--no-bleach-correction", "--psf-fwhm-nm", "250").engine_spec().options["bleach_order"] == 0
    assert "optics" not in parse("demo", "--engine", "convgru").engine_spec().options  # only sofi takes them


@pytest.mark.parametrize("argv, words", [
    (["demo", "--psf-fwhm-nm", "250", "--na", "1.3"], "not both"),
    (["demo", "--na", "3"], "na must be in"),
    (["demo", "--lag", "-1"], "lag must be 'auto' or an integer >= 0"),
    (["demo", "--lag", "often"], "lag must be 'auto'"),
    (["demo", "--pixel-size-um", "0"], "positive number"),
    (["demo", "--bleach-order", "7"], "bleach_order must be 0 (off) .. 3"),
])
def test_bad_sofi_flags_are_clear_errors(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_engine_command_takes_the_sofi_flags():
    from realtime.config import SofiOptions
    from realtime.remote import EngineServerConfig

    cfg = EngineServerConfig(sofi=SofiOptions(na=1.2, lag=0)).validate()
    assert cfg.engine_spec().options["optics"] == {"na": 1.2} and cfg.engine_spec().options["lag"] == 0
    with pytest.raises(ValueError, match="na must be"):
        EngineServerConfig(sofi=SofiOptions(na=9.0)).validate()


def test_trust_flags_map_onto_config():
    d = parse("demo", "--engine", "convlstm")
    assert d.trust is True and d.trust_window == 100
    c = parse("demo", "--engine", "convlstm", "--trust-window", "150", "--no-trust")
    assert c.trust is False and c.trust_window == 150
    with pytest.raises(SystemExit):
        parse("demo", "--trust-window", "5")  # at least 10 frames
    with pytest.raises(ValueError, match="trust_window"):
        PipelineConfig(trust_window=3).validate()
