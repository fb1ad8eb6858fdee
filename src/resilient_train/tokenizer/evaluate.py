"""``python -m resilient_train.evaluate --tokenizer DIR --data PATH... [--json]``: the training metrics, standalone.

Every clip of the given videos or folders (cut as in training, :mod:`.video`) is encoded and
decoded by the exported tokenizer; prints MSE, PSNR, SSIM, codebook usage and perplexity
(:mod:`.metrics`) as a table, or one JSON object with ``--json``. ``--precision`` runs the tokenizer
under autocast as in training (:mod:`.autocast`); the metrics are computed in float32. Nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .autocast import PRECISIONS

__all__ = ["evaluate_model", "evaluate_tokenizer", "main"]


def evaluate_tokenizer(
    tokenizer_dir: Path,
    data: list[Path],
    *,
    batch_size: int = 4,
    max_clips: int = 0,
    device: str = "cpu",
    precision: str = "32",
) -> dict[str, Any]:
    from ..data.clips import Preprocessing
    from ..data.folder import clips_of
    from .autocast import check_precision
    from .export import load_tokenizer, read_config

    check_precision(precision, torch.device(device), "--precision")
    cfg = read_config(tokenizer_dir)
    c, vcff = cfg["clip"], bool(cfg["video_contains_first_frame"])
    n = int(c["num_frames"])
    clips, skipped = clips_of(data, Preprocessing(n, 1, n, int(c["image_size"]), int(c["channels"])))
    model = load_tokenizer(tokenizer_dir, device)
    count = min(len(clips), max_clips) if max_clips else len(clips)
    r = evaluate_model(model, clips, cfg["kwargs"]["fsq_levels"], vcff, batch_size, precision, count)
    return {"clips": count, "files": len(clips.files), "skipped": skipped, **r}


def evaluate_model(
    model: torch.nn.Module,
    clips: Sequence[torch.Tensor],
    fsq_levels: Sequence[int],
    video_contains_first_frame: bool,
    batch_size: int = 4,
    precision: str = "32",
    count: int | None = None,
) -> dict[str, float]:
    """The metrics (:mod:`.metrics`) of a generator (eval mode, on its device) on the first ``count`` (default: all)
    ``(C, T, H, W)`` clips in [0, 1] of ``clips`` (indexed one at a time, so a dataset is decoded batch by batch):
    each batch encoded, quantized and decoded as the exported tokenizer does; the metrics in float32."""
    from .autocast import autocast
    from .metrics import Reconstruction

    device = next(iter(model.parameters())).device  # VideoTokenizer.parameters() returns a list
    metrics = Reconstruction(fsq_levels)
    count = len(clips) if count is None else count
    for b in range(0, count, batch_size):
        video = torch.stack([clips[k] for k in range(b, min(b + batch_size, count))]).to(device)
        with torch.no_grad(), autocast(precision, video.device):
            quantized, codes = model.encode(video, quantize=True, video_contains_first_frame=video_contains_first_frame)
            recon = model.decode(quantized, video_contains_first_frame=video_contains_first_frame)
        metrics.add(video, recon.float(), codes)
    return metrics.result()


def main(argv: list[str] | None = None) -> int:
    from .model import quiet_library_warnings

    quiet_library_warnings()
    p = argparse.ArgumentParser(prog="python -m resilient_train.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", type=Path, required=True, help="a folder written by resilient_train.export")
    p.add_argument("--data", type=Path, nargs="+", required=True, help="video files or folders")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-clips", type=int, default=0, help="evaluate at most this many clips (0: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=list(PRECISIONS), default="32", help="autocast, as trainer.precision")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        r = evaluate_tokenizer(
            args.tokenizer,
            args.data,
            batch_size=args.batch_size,
            max_clips=args.max_clips,
            device=args.device,
            precision=args.precision,
        )
    except (OSError, ValueError) as exc:  # a missing or unusable input or tokenizer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(r))
        return 0
    rows = [
        ("clips", f"{r['clips']} from {r['files']} file(s)"),
        ("MSE", f"{r['mse']:.6g}"),
        ("PSNR", f"{r['psnr']:.2f} dB"),
        ("SSIM", f"{r['ssim']:.4f}"),
        ("codebook used", f"{100 * r['codebook_usage']:.2f}%"),
        ("perplexity", f"{r['codebook_perplexity']:.1f}"),
    ]
    print("\n".join(f"{k + ':':<15}{v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
