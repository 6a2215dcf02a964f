"""bench/gpu_check.py, the one command a lent GPU machine runs first: here, without CUDA, it must run the CPU side
of every step and exit 0, so that on the day a GPU is lent the script works the first time."""
import json
import subprocess
import sys

import pytest
import torch

from helpers import CHILD_ENV, ROOT


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine run the check itself (it takes minutes)")
def test_the_cpu_side_of_every_step_runs(tmp_path):
    # the budget is the GPU machine's; here every step must run, however loaded the machine (within the timeout)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path), "--budget-s", "850"],
                       cwd=tmp_path,
                       env={k: v for k, v in CHILD_ENV.items() if k != "OUT"}, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = {s["step"]: s for s in res["steps"]}
    assert res["cuda"] is False and "no CUDA" in steps["environment"]["note"]
    assert list(steps) == ["environment", "cuda-marked tests", "backbone only", "featurize", "decode: NVDEC vs CPU",
                           "finetune", "predict --stream", "named checks (issue 31)"]
    assert {n: s["status"] for n, s in steps.items() if s["status"] != "ok"} == {}, \
        {n: s.get("why") for n, s in steps.items()}
    # each measuring step has its figures: frames/s from a real featurize and decode, a finetune, stream latency
    feat = steps["featurize"]["rows"]
    assert [r["decode_workers"] for r in feat] == [1, 2] and all(r["frames"] > 0 and r["frames_per_s"] > 0 for r in feat)
    assert all(r["vs_backbone_only"] > 0 for r in feat)
    decode = {r["decoder"]: r for r in steps["decode: NVDEC vs CPU"]["rows"]}
    assert decode["pyav on cpu"]["frames"] > 0 and decode["pyav on cpu"]["frames_per_s"] > 0
    assert "skipped" in decode["torchcodec on cuda"]  # NVDEC needs CUDA: listed with the reason, not measured
    assert steps["finetune"]["rows"][0]["seconds"] > 0
    assert steps["predict --stream"]["rows"][0]["latency_p50_ms"] > 0
    named = steps["named checks (issue 31)"]["rows"]  # each with its expected outcome, for the first GPU machine
    assert len(named) >= 7 and all(r["expected"] and r["observed"] == "needs CUDA" and r["ok"] is None for r in named)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "# GPU check (no CUDA: the CPU side)" in md and "| precision | decode_workers |" in md
