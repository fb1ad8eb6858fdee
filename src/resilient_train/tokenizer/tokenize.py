"""``python -m resilient_train.tokenize --tokenizer DIR INPUT... --out OUT [--reconstruct]``: videos in, codes out.

INPUT: video files or folders (searched recursively); OUT must be new or empty, and each output file
appears whole or not at all (written under a temporary name, then renamed). Clips are cut and preprocessed exactly as in
training (:mod:`.video`: whole videos, ``--clip-stride``, resize and centre crop), encoded in
batches with the exported tokenizer (:mod:`.export`), and written as one safetensors file per
video under OUT, named after its path (``a/b.mp4`` -> ``a__b.mp4.safetensors``):

* ``codes``: int32 ``(clips, latent_frames, height, width)``, the FSQ code indices;
* ``clip_starts``: int64 ``(clips,)``, the first frame of each clip in the video;
* metadata: the source path, its size, frame count and content hash, the clip length, the
  first-frame flag, the tokenizer's source checkpoint.

The first-frame flag is passed explicitly (upstream ``tokenize()`` always assumes a leading first
frame): a clip of ``n`` frames is encoded when ``n - int(video_contains_first_frame)`` divides by the
tokenizer's temporal compression. ``--precision`` (``32``, ``bf16-mixed``, ``16-mixed``) runs the
encoder and decoder under autocast, as in training (:mod:`.autocast`). ``--reconstruct`` also
writes ``<name>.recon.mp4``: each clip's input above its reconstruction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from .autocast import PRECISIONS

__all__ = ["main", "tokenize_videos"]


def tokenize_videos(
    tokenizer_dir: Path,
    inputs: list[Path],
    out: Path,
    *,
    num_frames: int | None = None,
    clip_stride: int = 0,
    batch_size: int = 4,
    device: str = "cpu",
    precision: str = "32",
    reconstruct: bool = False,
    progress: bool = True,
) -> list[Path]:
    # Long on purpose: per video: index, encode in batches, write codes (and reconstructions) atomically.
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ..data.clips import Preprocessing
    from ..data.folder import clips_of
    from ..data.video import write_video
    from .autocast import autocast, check_precision
    from .export import load_tokenizer, read_config
    from .model import time_downsample_factor

    check_precision(precision, torch.device(device), "--precision")
    cfg = read_config(tokenizer_dir)
    vcff = bool(cfg["video_contains_first_frame"])
    n = int(num_frames or cfg["clip"]["num_frames"])
    tdf = time_downsample_factor(SimpleNamespace(layers=cfg["kwargs"]["layers"]))
    if n - int(vcff) <= 0 or (n - int(vcff)) % tdf:
        valid = [k * tdf + int(vcff) for k in range(1, 5)]
        raise ValueError(
            f"--num-frames {n}: this tokenizer takes clips of {', '.join(map(str, valid))}, ... frames "
            f"(video_contains_first_frame={vcff}, temporal compression {tdf})"
        )
    size, channels = int(cfg["clip"]["image_size"]), int(cfg["clip"]["channels"])
    prep = Preprocessing(n, 1, clip_stride or n, size, channels)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--out {out} exists and is not an empty folder; choose a new one (nothing is overwritten)"
        )
    clips, _ = clips_of(inputs, prep)
    model = load_tokenizer(tokenizer_dir, device)
    out.mkdir(parents=True, exist_ok=True)
    by_file: dict[int, list[int]] = {}
    for k, (i, _) in enumerate(clips.clips):
        by_file.setdefault(i, []).append(k)
    written = []
    bar = tqdm(total=len(clips), desc="tokenize", unit="clip", disable=not progress, file=sys.stderr)
    for i, ks in by_file.items():
        f = clips.files[i]
        codes, pairs = [], []
        for b in range(0, len(ks), batch_size):
            video = torch.stack([clips[k] for k in ks[b : b + batch_size]]).to(device)
            with torch.no_grad(), autocast(precision, video.device):
                quantized, c = model.encode(video, quantize=True, video_contains_first_frame=vcff)
                codes.append(c.to(torch.int32).cpu())
                if reconstruct:
                    recon = model.decode(quantized, video_contains_first_frame=vcff).float().clamp(0, 1).cpu()
                    pairs.append(torch.cat([video.cpu(), recon], dim=3))  # input above reconstruction
            bar.update(len(ks[b : b + batch_size]))
        name = f.rel.replace("/", "__")
        meta = {
            "source": f.rel,
            "size": str(f.size),
            "frames": str(f.frames),
            "content_xxh3_128": f.digest,
            "num_frames": str(n),
            "video_contains_first_frame": str(vcff),
            "tokenizer_source": json.dumps(cfg["source"]),
        }
        starts = torch.tensor([clips.clips[k][1] for k in ks], dtype=torch.int64)
        target = out / f"{name}.safetensors"
        tmp = out / f".tmp-{target.name}"  # every output appears whole or not at all
        save_file({"codes": torch.cat(codes), "clip_starts": starts}, str(tmp), metadata=meta)
        os.replace(tmp, target)
        written.append(target)
        if reconstruct:
            frames = torch.cat(pairs).permute(0, 2, 3, 4, 1).reshape(-1, 2 * size, size, channels)
            frames = (frames * 255).round().to(torch.uint8).numpy()
            if channels == 1:
                frames = frames.repeat(3, axis=3)
            write_video(out / f".tmp-{name}.recon.mp4", frames, codec="libx264", fps=8)
            os.replace(out / f".tmp-{name}.recon.mp4", out / f"{name}.recon.mp4")
    bar.close()
    return written


def main(argv: list[str] | None = None) -> int:
    from .model import quiet_library_warnings

    quiet_library_warnings()
    p = argparse.ArgumentParser(prog="python -m resilient_train.tokenize", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="video files or folders")
    p.add_argument("--tokenizer", type=Path, required=True, help="a folder written by resilient_train.export")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-frames", type=int, default=None, help="clip length (default: the training clip length)")
    p.add_argument("--clip-stride", type=int, default=0, help="a clip every N frames (default: end to end)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=list(PRECISIONS), default="32", help="autocast, as trainer.precision")
    p.add_argument("--reconstruct", action="store_true", help="also write <name>.recon.mp4 (input above output)")
    args = p.parse_args(argv)
    try:
        written = tokenize_videos(
            args.tokenizer,
            args.inputs,
            args.out,
            num_frames=args.num_frames,
            clip_stride=args.clip_stride,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            reconstruct=args.reconstruct,
        )
    except (OSError, ValueError) as exc:  # a missing or unusable input, tokenizer or output folder
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(written)} file(s) written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
