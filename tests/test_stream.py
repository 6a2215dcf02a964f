"""featseq predict --stream: a real pipe fed at the video's rate, the same file through --stream and predict FILE,
a stalled pipe, SIGTERM, a bad URL. Real processes, real MPEG-TS."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (torch before decord)
from click.testing import CliRunner

from featseq.cli import main
from helpers import CHILD_ENV, ROOT, wait_for
from featseq.featurize.cache import read_cache

HALF = 8.0  # seconds of each class in the long video


@pytest.fixture(scope="module")
def st_data(small_trained, tmp_path_factory):
    import av

    from featseq.featurize.synth import render_long_video

    d = tmp_path_factory.mktemp("stream")
    run = small_trained["run"]
    mp4 = d / "change.mp4"
    render_long_video(mp4, parts=[("ascending", HALF), ("descending", HALF)], width=32, height=32, video_fps=30, seed=5)
    ts = d / "change.ts"
    with av.open(str(mp4)) as i, av.open(str(ts), "w", format="mpegts") as o:  # the same H.264, as MPEG-TS
        s = o.add_stream_from_template(i.streams.video[0])
        for pk in i.demux(i.streams.video[0]):
            if pk.dts is not None:
                pk.stream = s
                o.mux(pk)
    return {"d": d, "run": run, "mp4": str(mp4), "ts": str(ts)}


def _cmd(*args):
    return [sys.executable, "-c", "from featseq.cli import main; main()", "predict", *args]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _feed(proc, data: bytes, seconds: float, stop_at: float | None = None):
    """Write ``data`` into proc's stdin spread over ``seconds`` (the video's real rate); stop writing (the pipe stays
    open) after the fraction ``stop_at`` of it."""
    n = 40
    step = len(data) // n + 1
    for k in range(n):
        if stop_at is not None and k >= n * stop_at:
            return
        try:
            proc.stdin.write(data[k * step:(k + 1) * step])
            proc.stdin.flush()
        except BrokenPipeError:
            return
        time.sleep(seconds / n)
    proc.stdin.close()


def _fed(cmd, data: bytes, seconds: float, logs: Path, stop_at: float | None = None, timeout: float = 180):
    """Run ``cmd`` with ``data`` fed into its standard input at the given rate; (returncode, stdout, stderr)."""
    with open(logs / "stdout", "wb") as o, open(logs / "stderr", "wb") as e:
        p = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdin=subprocess.PIPE, stdout=o, stderr=e)
        _feed(p, data, seconds, stop_at)
        p.wait(timeout=timeout)
        p.stdin.close()
    return p.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text()


def test_a_pipe_at_real_rate_follows_the_class_change(st_data):
    out = st_data["d"] / "pipe"
    out.mkdir()
    code, stdout, stderr = _fed(_cmd(st_data["run"], "--stream", "-", "--stride", "1", "--out", str(out),
                                     "--positive-windows", "2", "--threshold", "0.5"),
                                Path(st_data["ts"]).read_bytes(), 2 * HALF, out)
    assert code == 0, stderr
    rows = _rows(out / "predictions.csv")
    lines = [x for x in stdout.splitlines() if " s  " in x]
    assert len(lines) == len(rows) >= 8  # one line per window on stdout
    window = 4.0  # the run's 8 frames at 2 fps
    first = [x["predicted"] for x in rows if float(x["window_end"]) <= HALF]
    after = [x for x in rows if float(x["window_start"]) >= HALF]
    assert np.mean([c == "ascending" for c in first]) >= 0.75, first
    # within one window of the change every window is descending
    assert after and all(x["predicted"] == "descending" for x in after), [x["predicted"] for x in after]
    assert float(after[0]["window_start"]) <= HALF + 1 and float(after[0]["window_end"]) <= HALF + window + 1
    res = json.loads((out / "predict.json").read_text())
    assert res["stop"] == "end" and res["windows"] == len(rows) and res["live"] is True
    assert res["latency_s"]["p50"] > 0 and res["latency_s"]["max"] >= res["latency_s"]["p95"] >= res["latency_s"]["p50"]
    assert res["frames_dropped"] == 0 and res["frames_sampled"] == int(2 * HALF * 2)
    assert any(a["class"] == "descending" for a in res["alerts"]) and "ALERT descending" in stdout


def test_a_file_through_stream_equals_predict_file(st_data):
    """Same features at the same timestamps, the same windows and probabilities as predict FILE --window 4 --stride 1."""
    d = st_data["d"]
    kept, feats = d / "kept.h5", d / "stream_features.npz"
    # --stream in its own process (it ends with os._exit), started first; predict FILE meanwhile in this process
    # (what is compared is the two commands' outputs, not a process start)
    st = subprocess.Popen(_cmd(st_data["run"], "--stream", st_data["mp4"], "--stride", "1", "--out", str(d / "st"),
                               "--save-features", str(feats)), cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    r = CliRunner().invoke(main, ["predict", st_data["run"], st_data["mp4"], "--window", "4", "--stride", "1", "--out",
                                  str(d / "file"), "--cache", str(kept), "--no-plots"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    _, stderr = st.communicate(timeout=300)
    assert st.returncode == 0, stderr
    cache, got = read_cache(str(kept)), np.load(feats)
    assert np.allclose(got["times"], cache.timestamps, atol=1e-9)
    assert np.allclose(got["features"], cache.features.astype(np.float32), atol=1e-3)
    a, b = _rows(d / "file" / "predictions.csv"), _rows(d / "st" / "predictions.csv")
    assert [(x["window_start"], x["window_end"]) for x in a] == [(x["window_start"], x["window_end"]) for x in b]
    for x, y in zip(a, b):
        assert x["predicted"] == y["predicted"]
        for c in ("ascending", "descending", "pingpong"):
            assert abs(float(x[f"p_{c}"]) - float(y[f"p_{c}"])) < 1e-4
    res = json.loads((d / "st" / "predict.json").read_text())
    assert res["live"] is False and res["frames_dropped"] == 0
    assert res["frames_per_s"] > 0 and res["window_s"] > 0 and res["frames_sampled"] > 0  # what the report shows


def test_a_stalled_pipe_stops_with_the_predictions_so_far(st_data):
    out = st_data["d"] / "stall"
    out.mkdir()
    # 60 % of the stream, then nothing: the pipe stays open, only the stall ends it
    code, _, stderr = _fed(_cmd(st_data["run"], "--stream", "-", "--stride", "1", "--out", str(out), "--stall-timeout", "3"),
                           Path(st_data["ts"]).read_bytes(), 4.0, out, stop_at=0.6)
    assert code == 1, stderr
    assert "no frame for 3 s (stalled)" in stderr
    rows = _rows(out / "predictions.csv")
    res = json.loads((out / "predict.json").read_text())
    assert res["stop"] == "stall" and len(rows) == res["windows"] >= 1


def test_sigterm_stops_cleanly_and_keeps_the_windows(st_data):
    out = st_data["d"] / "term"
    p = subprocess.Popen(_cmd(st_data["run"], "--stream", st_data["mp4"], "--realtime", "--stride", "1", "--out", str(out)),
                         cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    def windows() -> int:  # the windows written so far (the file appears with the first)
        return len(_rows(out / "predictions.csv")) if (out / "predictions.csv").exists() else 0
    assert wait_for(lambda: windows() >= 2, timeout=120, proc=p), "no two windows within 120 s"
    os.kill(p.pid, signal.SIGTERM)
    _, stderr = p.communicate(timeout=30)  # it stops: a hang fails here
    assert p.returncode == 143, stderr
    res = json.loads((out / "predict.json").read_text())
    assert res["stop"] == "SIGTERM" and res["windows"] == len(_rows(out / "predictions.csv")) >= 2


def test_a_bad_url_fails_fast_naming_it(st_data, tmp_path):
    # in this process (the command's exit code and message are tested, not a process start): an exception that
    # escaped the CLI would be r.exception, not the SystemExit of a usage error
    t = time.monotonic()
    r = CliRunner().invoke(main, ["predict", st_data["run"], "--stream", "rtsp://127.0.0.1:9/cam", "--out",
                                  str(tmp_path / "o")])
    assert r.exit_code == 2 and "--stream rtsp://127.0.0.1:9/cam: cannot open it" in r.stderr, r.output
    assert "check the address" in r.stderr and isinstance(r.exception, SystemExit)
    assert time.monotonic() - t < 30
    r = CliRunner().invoke(main, ["predict", st_data["run"], "--stream", str(tmp_path / "nope.mp4")])
    assert r.exit_code == 2 and "no such file, device or URL" in r.stderr, r.output
