"""``make bench-quality`` (:mod:`benchmarks.quality`): the clips both trainers read are the same tensors (and a
lossy file is caught), its verdicts fail when they should, and ``--quick`` runs both trainers end to end from
the same initial weights (slow). No training quality is asserted here: that is the benchmark's report."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from benchmarks.quality_data import LOSSLESS, SPARE_FRAMES, check_readers, write_clips
from benchmarks.quality_report import verdicts
from resilient_train.data.video import write_video


def test_both_readers_decode_the_lossless_clips_identically_and_a_file_they_cut_differently_is_caught(tmp_path):
    clips = write_clips(tmp_path / "clips", train=3, val=2, num_frames=5, image_size=16)
    seen = check_readers(clips / "train", 5, 16)
    # upstream's reader loses two frames of each file (frames[:-1], then [:, :-1]): what SPARE_FRAMES covers
    assert seen == {"frames_in_file": 5 + SPARE_FRAMES, "frames_upstream_reads": 5}
    rng = np.random.default_rng(0)
    # larger than the model's frames: ours resizes the shorter side then crops, upstream's MP4 reader only crops
    write_video(clips / "train" / "wide.mp4", rng.integers(0, 256, (7, 24, 32, 3), dtype=np.uint8), **LOSSLESS)
    with pytest.raises(AssertionError, match=r"wide\.mp4: our reader and magvit2-pytorch's differ"):
        check_readers(clips / "train", 5, 16)


def seed_result(ours: list[float], ema: list[float], upstream: list[float], exported: tuple[float, float]) -> dict:
    steps = [0, 100, 200, 300, 400]

    def curve(values):
        return [{"step": s, "psnr": v} for s, v in zip(steps, values)]

    return {
        "curves": {
            "ours_model": curve(ours),
            "ours_ema": curve(ema),
            "upstream_model": curve(upstream),
            "upstream_ema": curve(upstream),
        },
        "exported": {"ours": {"psnr": exported[0]}, "upstream": {"psnr": exported[1]}},
    }


@pytest.mark.parametrize(
    "ours, ema, upstream, exported, failed",
    [
        ([10, 14, 15, 16, 17], [10, 14, 15, 16, 17], [10, 13, 14, 15, 16], (17, 16), set()),
        ([10, 14, 15, 15, 16], [10, 14, 15, 15, 16], [10, 13, 14, 16, 16.1], (17, 16), {"trained_ok"}),
        ([10, 14, 15, 16, 17], [10, 14, 15, 16, 17], [10, 13, 14, 15, 16], (15.9, 16), {"exported_ok"}),
        ([10, 14, 15, 16, 17], [10, 13.4, 15, 16, 17], [10, 13, 14, 15, 16], (17, 16), {"ema_ok"}),
        ([10, 14, 15, 16, 17], [2, 14, 15, 16, 17], [10, 13, 14, 15, 16], (17, 16), set()),  # before step 100
    ],
    ids=["pass", "trained-below", "export-below", "ema-behind", "ema-behind-before-100"],
)
def test_verdicts_fail_where_they_should(ours, ema, upstream, exported, failed):
    v = verdicts([seed_result(ours, ema, upstream, exported)], steps=400)
    assert {k for k in ("trained_ok", "exported_ok", "ema_ok") if not v[k]} == failed
    assert v["trained_second_half_psnr"]["ours"] == pytest.approx(np.mean(ours[3:]))  # steps 300, 400


@pytest.mark.slow
def test_quick_run_trains_both_sides_from_the_same_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.quality", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality.json").read_text())
    (seed,) = result["seeds"]
    curves = seed["curves"]
    assert {n: [p["step"] for p in c] for n, c in curves.items()} == {n: [0, 20, 40] for n in curves}
    assert len({json.dumps(c[0], sort_keys=True) for c in curves.values()}) == 1  # one initial model, one code
    for name in ("ours_model", "upstream_model"):  # both sides trained: the weights moved
        assert curves[name][-1]["psnr"] != curves[name][0]["psnr"], name
    assert seed["upstream_steps"] == 40 and seed["upstream_discr_optimizer_steps"] == 80  # its quirk, counted
    assert seed["upstream_lr"] == pytest.approx(1e-3)  # warmup_steps=1: its rate is the base rate
    assert (tmp_path / "quality.png").stat().st_size > 10_000
    assert "both readers decode them identically" in proc.stdout
