"""The live trust signal (engines.trust) on its own, in the worker and in the pipeline.

Real components: the companion is the real streaming SOFI, the worker runs on real ZeroMQ
sockets, the pipeline replays the real static donut (skipped when absent) or runs the
simulated camera. The "networks" are small stand-ins with ``learned = True``: one that shows
what the data support (SOFI of its own 20 frames), one that draws a fixed prior whatever the
data, and a plain mean; the signal must tell them apart.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage

from conftest import LearnedMean, MeanEngine, PriorNetwork, ResultCollector, seq_frame
from engines.sofi import SofiEngine
from engines.trust import (
    MIN_AGREEMENT,
    TrustConfig,
    TrustMonitor,
    TrustReport,
    TrustTally,
    agreement,
    frame_snr,
)
from realtime.config import Addresses, PipelineConfig
from realtime.pipeline import Pipeline
from realtime.protocol import ReferenceHeader, ResultHeader, StatsMessage, decode, encode_reference
from realtime.worker import EngineWorker


class SofiAsNetwork(SofiEngine):
    """A 'network' that shows exactly what its 20 frames support: SOFI of them."""

    name = "honest-net"
    learned = True


def _cfg(**kw) -> PipelineConfig:
    base = dict(size=64, fps=200.0, worker_mode="thread", threads=1, seconds=None,
                addresses=Addresses("tcp://127.0.0.1:0", "tcp://127.0.0.1:0"))
    base.update(kw)
    return PipelineConfig(**base)


# ----------------------------------------------------------------------------- pieces
def test_agreement_is_a_blurred_pearson_and_none_for_flat_images():
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.random((40, 40)), 2)
    assert agreement(a, a) == pytest.approx(1.0)
    assert agreement(a, 3 * a + 1) == pytest.approx(1.0)  # scale-free
    assert agreement(a, np.ones_like(a)) is None
    noisy = a + rng.normal(0, a.std(), a.shape)
    assert agreement(noisy, a, blur_px=1.0) > agreement(noisy, a, blur_px=0.0)  # the blur forgives noise
    with pytest.raises(ValueError, match="shape"):
        agreement(a, a[:30])


def test_frame_snr_is_the_top_percent_in_noise_sds():
    rng = np.random.default_rng(1)
    noise = 100 + 5 * rng.standard_normal((128, 128))
    assert frame_snr(noise) == pytest.approx(2.33, abs=0.15)  # the 99th percentile of N(0, 1)
    spots = noise.copy()
    spots[rng.integers(0, 128, 400), rng.integers(0, 128, 400)] += 200
    assert frame_snr(spots) > 20
    assert frame_snr(np.full((16, 16), 7.0)) == 0.0  # nothing above the median
    with pytest.raises(ValueError):
        frame_snr(np.zeros((3, 4, 5)))


def test_config_refuses_bad_values_and_unknown_keys():
    with pytest.raises(ValueError, match="window"):
        TrustConfig(window=5)
    with pytest.raises(ValueError, match="unknown trust option"):
        TrustConfig.coerce({"windw": 100})
    assert TrustConfig.coerce({"window": 30, "psf_range_px": [1, 2]}).psf_range_px == (1, 2)


def _blinking_movie(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    from acquisition.simulation import BlinkingScene, SimulationConfig

    return BlinkingScene(SimulationConfig(size=size, seed=seed)).frames(n).astype(np.float32)


def test_monitor_checks_only_once_its_window_is_full_then_agrees_with_an_honest_output():
    movie = _blinking_movie(60)
    mon = TrustMonitor({"window": 40, "every_s": 0.0})
    honest = SofiEngine(window=20)
    for k, f in enumerate(movie[:30]):
        mon.add(f, k)
    r = mon.assess(honest.reconstruct(movie[10:30]), 29)
    assert r.ok is None and r.reason == "checking" and "30 so far" in r.message and r.agreement is None
    for k, f in enumerate(movie[30:], 30):
        mon.add(f, k)
    r = mon.assess(honest.reconstruct(movie[-20:]), 59)
    assert r.agreement is not None and r.agreement > MIN_AGREEMENT and r.ok is True, r
    assert r.measured_at == 59 and mon.reference is not None
    img, first, last = mon.reference
    assert img.shape == (64, 64) and (first, last) == (20, 59)
    info = r.info()
    assert info["trust.ok"] is True and info["trust.reason"] == "agrees" and info["trust.reference_frames"] == 40
    mon.reset()
    assert mon.frames_seen == 0 and mon.assess(img, 0).ok is None


def test_monitor_flags_a_prior_an_off_range_psf_and_a_failed_blinking_check():
    movie = _blinking_movie(40)
    prior = PriorNetwork()
    for f in movie[:19]:
        prior.push(f)
    mon = TrustMonitor({"window": 30, "every_s": 0.0})
    for k, f in enumerate(movie):
        mon.add(f, k)
    r = mon.assess(prior.push(movie[-1]), 39)
    assert r.ok is False and r.reason == "low agreement" and r.agreement < MIN_AGREEMENT
    assert "Switch to SOFI" in r.message
    wide = TrustMonitor({"window": 10, "sofi": {"psf_fwhm_px": 5.0}})
    wide.add(movie[0])
    assert any("PSF FWHM 5.00 px is outside the training range 1.2-3.5 px" in w for w in wide.input_warnings())
    failed = {"ok": False, "reason": "static fluorescence and shot noise"}
    r = TrustMonitor({"window": 10}).assess(movie[0], blinking=failed)
    assert r.ok is False and r.reason == "out of domain" and "no independent blinking" in r.warnings[0]


def test_tally_summarises_verdicts_once_per_measurement():
    t = TrustTally()
    assert t.summary() is None and not t.add({"psf_fwhm_px": 2.0})  # an engine without a verdict
    base = dict(reference_frames=100, min_agreement=MIN_AGREEMENT)
    for info in (TrustReport(None, None, "checking", "…", **base).info(),
                 TrustReport(True, 0.8, "agrees", "…", measured_at=99, **base).info(),
                 TrustReport(True, 0.8, "agrees", "…", measured_at=99, **base).info(),
                 TrustReport(False, 0.3, "low agreement", "…", warnings=("agreement 0.30 with SOFI",),
                             measured_at=150, **base).info(),
                 TrustReport(False, 0.2, "low agreement", "…", warnings=("agreement 0.20 with SOFI",),
                             measured_at=200, **base).info()):
        assert t.add(info)
    s = t.summary()
    assert s["outputs"] == 5 and s["outputs_flagged"] == 2 and s["flagged_share"] == pytest.approx(0.4)
    assert s["outputs_checking"] == 1 and s["agreement_measurements"] == 3
    assert s["agreement_median"] == pytest.approx(0.3) and s["agreement_min"] == pytest.approx(0.2)
    assert s["warnings"] == ["agreement 0.30 with SOFI"]  # each kind once, not once per number
    assert s["last"]["ok"] is False and s["reference_frames"] == 100
    json.dumps(s)


def test_reference_message_round_trips():
    img = np.arange(12, dtype=np.float32).reshape(3, 4)
    h = ReferenceHeader(seq_first=0, seq_last=99, shape=(3, 4), run_id="ab12", info={"trust.agreement": 0.7})
    back, arr = decode(encode_reference(h, img))
    assert back == h and np.array_equal(arr, img)
    from realtime.protocol import ProtocolError

    with pytest.raises(ProtocolError):
        encode_reference(ReferenceHeader(seq_first=5, seq_last=4, shape=(3, 4)), img)


# ----------------------------------------------------------------------------- the worker
@pytest.fixture
def run_worker(frame_pusher, make_tcp_addr):
    """Run a worker over a list of frames; return its results and references (real sockets)."""
    started = []

    def _run(engine, frames, **kw):
        w = EngineWorker(engine, frame_pusher.addr, make_tcp_addr(), stats_interval_s=0.05, **kw)
        w.run_in_thread()
        assert w.wait_ready(60)
        rc = ResultCollector(w.out_addr)
        rc.wait_ready()
        started.append((w, rc))
        for s, f in enumerate(frames):
            frame_pusher.frame(s, f)
            time.sleep(0.002)
        frame_pusher.eos()
        results, refs = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not rc.sock.poll(100):
                continue
            h, img = decode(rc.sock.recv_multipart())
            if isinstance(h, ReferenceHeader):
                refs.append((h, np.array(img)))
            elif isinstance(h, ResultHeader):
                results.append((h, np.array(img)))
            elif isinstance(h, StatsMessage) and h.final:
                return results, refs
        raise TimeoutError("no final stats from the worker")

    yield _run
    for w, rc in started:
        w.stop()
        w.join(10)
        rc.close()


def test_worker_puts_trust_on_learned_outputs_only(run_worker):
    frames = [seq_frame(s) for s in range(16)]
    plain, refs = run_worker(MeanEngine(window=4), frames)
    assert plain and not any(k.startswith("trust.") for k in plain[-1][0].info) and not refs
    learned, refs = run_worker(LearnedMean(window=4), frames, trust_options={"window": 10, "every_s": 0.0})
    info = learned[-1][0].info
    assert {"trust.ok", "trust.agreement", "trust.reason", "trust.message", "trust.warnings"} <= set(info)
    assert info["trust.reference_frames"] == 10 and info["trust.measured_at"] == 15
    assert refs, "the companion SOFI image was published"
    h, img = refs[-1]
    assert h.seq_last - h.seq_first + 1 == 10 and h.seq_last <= 15 and img.shape == (16, 16)
    assert "trust.agreement" in h.info
    off, _ = run_worker(LearnedMean(window=4), frames, trust=False)
    assert not any(k.startswith("trust.") for k in off[-1][0].info)


def test_worker_says_when_the_check_cannot_run(run_worker):
    res, _ = run_worker(LearnedMean(window=4), [seq_frame(s) for s in range(8)],
                        trust_options={"window": 10, "sofi": {"lag": -3}})
    info = res[-1][0].info
    assert info["trust.ok"] is None and info["trust.reason"].startswith("unavailable: ValueError")


# ----------------------------------------------------------------------------- the pipeline
def test_static_donut_triggers_the_warning(shared_data, tmp_path):
    donut = shared_data / "real-static-donut-100f.tif"
    if not donut.exists():
        pytest.skip(f"unavailable: {donut} not present")
    pipe = Pipeline(_cfg(source=str(donut), fps=400.0, json=tmp_path / "m.json", trust_window=50),
                    engine=LearnedMean(window=20))
    results, refs, warned = [], [], []
    pipe.resultReady.connect(lambda h, img: results.append(h))
    pipe.referenceReady.connect(lambda h, img: refs.append((h, img)))
    pipe.warning.connect(warned.append)
    m = pipe.run_for(None)
    assert m.errors == [] and m.outputs_received == len(results) > 0  # references are no outputs
    flagged = [h for h in results if h.info.get("trust.ok") is False]
    assert flagged and "no independent blinking" in flagged[-1].info["trust.warnings"]
    assert flagged[-1].info["trust.message"].startswith("Do not trust this image")
    d = json.loads((tmp_path / "m.json").read_text())
    assert d["trust"]["outputs_flagged"] >= 1 and d["trust"]["flagged_share"] > 0.5
    assert any("no independent blinking" in w for w in d["trust"]["warnings"])
    assert any("do not trust the image" in w for w in warned)
    assert refs and refs[-1][1].shape == (64, 64) and refs[-1][0].seq_last - refs[-1][0].seq_first + 1 == 50


def test_in_domain_simulation_with_an_honest_network_gets_no_warning(tmp_path):
    pipe = Pipeline(_cfg(json=tmp_path / "m.json", trust_window=60), engine=SofiAsNetwork(window=20))
    results = []
    pipe.resultReady.connect(lambda h, img: results.append(h))
    m = pipe.run_for(2.5)
    assert m.errors == [] and m.blinking_check and m.blinking_check["ok"] is True
    tr = m.trust
    assert tr is not None and tr["agreement_measurements"] >= 1, tr
    assert tr["outputs_flagged"] == 0 and tr["warnings"] == [], tr
    assert tr["agreement_median"] > MIN_AGREEMENT
    last = results[-1].info
    assert last["trust.ok"] is True and last["trust.message"].startswith("Agrees with SOFI of the last 60 frames")
    assert json.loads((tmp_path / "m.json").read_text())["trust"]["outputs_flagged"] == 0


def test_a_network_drawing_its_prior_is_flagged_on_the_same_data():
    pipe = Pipeline(_cfg(trust_window=60), engine=PriorNetwork())
    m = pipe.run_for(2.5)
    tr = m.trust
    assert tr is not None and tr["agreement_measurements"] >= 1 and tr["outputs_flagged"] >= 1, tr
    assert tr["agreement_min"] < MIN_AGREEMENT
    assert any(w.startswith("agreement") for w in tr["warnings"])
    assert "trust" in m.summary() and "flagged" in m.summary()
