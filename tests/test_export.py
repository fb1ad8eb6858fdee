"""`python -m resilient_train.export`: the tokenizer, loaded by magvit2-pytorch alone, gives our codes bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, train_env

import resilient_train
from resilient_train.checkpoint import committed, load_checkpoint
from resilient_train.tokenizer.export import LOAD_SNIPPET
from resilient_train.tokenizer.model import build_model

ALONE = """
import sys, torch
{snippet}
video = torch.load(sys.argv[1])
with torch.no_grad():
    _, codes = tokenizer.encode(video, quantize=True, video_contains_first_frame=True)
torch.save(codes, sys.argv[2])
assert not any(m.startswith("resilient_train") for m in sys.modules), "the project was imported"
"""


def export(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "resilient_train.export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=train_env())


def video() -> torch.Tensor:
    return torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0))


def encode_alone(out: Path, tmp_path: Path) -> torch.Tensor:
    """The codes of :func:`video` from the folder ``out``, loaded by the README's lines in a process that never
    imports resilient_train."""
    torch.save(video(), tmp_path / "video.pt")
    script = ALONE.format(snippet=LOAD_SNIPPET.format(dir=out))
    alone = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "video.pt"), str(tmp_path / "codes.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    return torch.load(tmp_path / "codes.pt")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The EMA tokenizer of the shared tiny run, exported once (read-only for the tests)."""
    out = tmp_path_factory.mktemp("export") / "tok"
    proc = export(trained_run, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_export_loads_with_magvit2_alone_and_gives_our_codes_bit_for_bit(trained_run, exported, tmp_path):
    out = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "tokenizer.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    ckpt = committed(trained_run / "checkpoints")[-1]
    assert cfg["source"]["step"] == 20 and cfg["source"]["checkpoint"] == str(ckpt.resolve())
    assert cfg["kwargs"]["use_fsq"] is True and cfg["kwargs"]["flash_attn"] is False
    assert cfg["kwargs"]["perceptual_loss_weight"] == 0.0 and "discr" not in cfg["kwargs"]
    assert cfg["clip"] == {"num_frames": 5, "image_size": 16, "channels": 3}
    assert cfg["video_contains_first_frame"] is True and cfg["weights"] == "ema"

    # magvit2-pytorch alone, in a process that never imports resilient_train, with the README's lines.
    assert LOAD_SNIPPET.format(dir=out) in (out / "README.md").read_text()
    codes_alone = encode_alone(out, tmp_path)

    # Our own encode: the checkpoint's EMA weights in the model the trainer builds.
    state = load_checkpoint(ckpt).state
    from omegaconf import OmegaConf

    ours = build_model(OmegaConf.create(state["config"]["model"])).copy_for_eval()
    ours.load_state_dict(state["ema"], strict=True)
    with torch.no_grad():
        _, codes_ours = ours.eval().encode(video(), quantize=True, video_contains_first_frame=True)
        _, codes_loaded = resilient_train.load_tokenizer(out).encode(video(), quantize=True)
    assert codes_alone.dtype == codes_ours.dtype and codes_alone.shape == (2, 3, 8, 8)
    assert torch.equal(codes_alone, codes_ours) and torch.equal(codes_loaded, codes_ours)
    assert codes_ours.unique().numel() > 1


def test_raw_model_weights_and_refusals(trained_run, tmp_path):
    out = tmp_path / "raw"
    assert export(trained_run, "--out", out, "--weights", "model").returncode == 0
    state = load_checkpoint(committed(trained_run / "checkpoints")[-1]).state
    from safetensors.torch import load_file

    weights = load_file(out / "tokenizer.safetensors")
    assert weights and not any(k.startswith("discr") for k in weights)
    assert all(torch.equal(v, state["model"][k]) for k, v in weights.items())

    again = export(trained_run, "--out", out)
    assert again.returncode == 2 and "exists" in again.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = export(empty, "--out", tmp_path / "x")
    assert nothing.returncode == 2 and "no committed checkpoint" in nothing.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".tmp-*"))


def test_tokenize_folders_into_codes_per_video_with_reconstructions(exported, tmp_path):
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import load_file

    from resilient_train.data import probe, write_video

    tok = exported
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    write_video(videos / "sub" / "b.mkv", exact, codec="ffv1")  # lossless, already 16x16: frames known exactly
    write_video(videos / "a.mp4", rng.integers(0, 256, (12, 24, 32, 3), dtype=np.uint8), codec="libx264")
    out = tmp_path / "codes"
    cmd = [sys.executable, "-m", "resilient_train.tokenize", "--tokenizer", str(tok), str(videos), "--out", str(out)]
    proc = subprocess.run([*cmd, "--reconstruct"], capture_output=True, text=True, timeout=300, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "a.mp4.recon.mp4",
        "a.mp4.safetensors",
        "sub__b.mkv.recon.mp4",
        "sub__b.mkv.safetensors",
    ]
    a = load_file(out / "a.mp4.safetensors")
    assert a["clip_starts"].tolist() == [0, 5] and a["codes"].shape == (2, 3, 8, 8) and a["codes"].dtype == torch.int32
    b = load_file(out / "sub__b.mkv.safetensors")
    assert b["clip_starts"].tolist() == [0]
    clip = torch.from_numpy(exact[:5]).permute(3, 0, 1, 2).float().div(255)[None]  # (1, C, T, H, W)
    with torch.no_grad():
        _, want = resilient_train.load_tokenizer(tok).encode(clip, quantize=True, video_contains_first_frame=True)
    assert torch.equal(b["codes"], want.to(torch.int32))
    with safe_open(out / "sub__b.mkv.safetensors", "pt") as f:
        meta = f.metadata()
    assert (meta["source"], meta["frames"], meta["num_frames"]) == ("sub/b.mkv", "7", "5")
    frames, _, width, height, _ = probe(str(out / "a.mp4.recon.mp4"))
    assert (frames, width, height) == (10, 16, 32)  # 2 clips of 5 frames, input above reconstruction

    bad = subprocess.run([*cmd, "--num-frames", "4"], capture_output=True, text=True, timeout=300, env=train_env())
    assert bad.returncode == 2 and "takes clips of 3, 5, 7, 9" in bad.stderr

    # The training metrics, standalone, on the clip whose frames are known exactly.
    ev = [sys.executable, "-m", "resilient_train.evaluate", "--tokenizer", str(tok), "--data", str(videos / "sub")]
    proc = subprocess.run([*ev, "--json"], capture_output=True, text=True, timeout=300, env=train_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    from resilient_train.tokenizer.metrics import codebook_stats, psnr, ssim

    with torch.no_grad():
        model = resilient_train.load_tokenizer(tok)
        q, codes = model.encode(clip, quantize=True, video_contains_first_frame=True)
        recon = model.decode(q, video_contains_first_frame=True).clamp(0, 1)
    assert report["clips"] == 1 and report["psnr"] == float(psnr(clip, recon)[0])
    assert report["ssim"] == float(ssim(clip, recon)[0])
    assert report["codebook_usage"] == codebook_stats(codes, 1000)["codebook_usage"]


@pytest.mark.parametrize(
    "dtype, torch_dtype", [("bf16", torch.bfloat16), pytest.param("fp16", torch.float16, marks=pytest.mark.slow)]
)
def test_a_half_precision_export_halves_the_weights_and_loads_with_magvit2_alone(
    trained_run, exported, tmp_path, dtype, torch_dtype
):
    from safetensors.torch import load_file

    out = tmp_path / f"tok-{dtype}"
    proc = export(trained_run, "--out", out, "--dtype", dtype)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, half = load_file(exported / "tokenizer.safetensors"), load_file(out / "tokenizer.safetensors")
    assert full.keys() == half.keys()
    for k, v in half.items():  # the float32 weights rounded, the integer buffers as they were
        assert v.dtype == (torch_dtype if full[k].is_floating_point() else full[k].dtype), k
        assert torch.equal(v, full[k].to(v.dtype)), k
    size = (out / "tokenizer.safetensors").stat().st_size / (exported / "tokenizer.safetensors").stat().st_size
    assert 0.45 < size < 0.55, size
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype

    # The README's lines, in a process that never imports resilient_train, give the codes of the rounded weights.
    codes_alone = encode_alone(out, tmp_path)
    loaded = resilient_train.load_tokenizer(out)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    with torch.no_grad():
        _, ours = loaded.encode(video(), quantize=True, video_contains_first_frame=True)
    assert torch.equal(codes_alone, ours)

    bad = export(trained_run, "--out", tmp_path / "x", "--dtype", "fp8")
    assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr and "float32" in bad.stderr


@pytest.mark.slow  # moved to keep the default suite under 15 minutes
def test_tokenize_and_evaluate_run_in_each_precision_and_refuse_an_unknown_one(exported, tmp_path):
    from safetensors.torch import load_file

    from resilient_train.data import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    rng = __import__("numpy").random.default_rng(1)
    write_video(videos / "a.mkv", rng.integers(0, 256, (10, 16, 16, 3), dtype="uint8"), codec="ffv1")
    env = train_env()

    def tool(name: str, *args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", f"resilient_train.{name}", "--tokenizer", str(exported), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    psnr = {}
    for precision in ("32", "bf16-mixed"):
        out = tmp_path / f"codes-{precision}"
        proc = tool("tokenize", str(videos), "--out", str(out), "--precision", precision, "--reconstruct")
        assert proc.returncode == 0, proc.stderr[-3000:]
        codes = load_file(out / "a.mkv.safetensors")["codes"]
        assert codes.dtype == torch.int32 and codes.shape == (2, 3, 8, 8)
        assert (out / "a.mkv.recon.mp4").stat().st_size > 0
        ev = tool("evaluate", "--data", str(videos), "--precision", precision, "--json")
        assert ev.returncode == 0, ev.stderr[-3000:]
        psnr[precision] = json.loads(ev.stdout)["psnr"]
    # bfloat16 autocast reconstructs nearly as well as float32 (it is not the same arithmetic, so not equal).
    assert abs(psnr["bf16-mixed"] - psnr["32"]) < 1.0, psnr

    for name, args in (
        ("tokenize", (str(videos), "--out", str(tmp_path / "x"))),
        ("evaluate", ("--data", str(videos))),
    ):
        bad = tool(name, *args, "--precision", "fp8")
        assert bad.returncode == 2 and "invalid choice: 'fp8'" in bad.stderr and "bf16-mixed" in bad.stderr, bad.stderr
