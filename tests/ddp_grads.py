"""Run under torchrun by test_ranks.py: DDP's gradients against the mean of each rank's own, bit for bit.

Every rank builds the trainer (same initial weights, its own random stream, its own clip), then
for the generator pass and for the discriminator pass with the gradient penalty computes its
gradients twice: on the bare model (no exchange) and through the trainer's DDP wrapper, from the
same RNG state. Rank 0 gathers the bare gradients, averages them in rank order as DDP does (each
divided by the world size, then summed) and compares every parameter's gradient bit for bit.
Prints one JSON line on rank 0; exits 0 when all match.
"""

from __future__ import annotations

import json
import sys
import tempfile

import torch

from resilient_train.config import compose
from resilient_train.dist import from_env
from resilient_train.train.ranks import wrap_ddp
from resilient_train.train.trainer import Trainer


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def run_pass(trainer: Trainer, net: torch.nn.Module, video: torch.Tensor, kind: str) -> dict[str, torch.Tensor | None]:
    for p in trainer.model.discr.parameters():  # the tokenizer's parameters() lists the generator's only
        p.grad = None
    trainer.model.zero_grad(set_to_none=True)
    vcff = trainer.cfg.model.video_contains_first_frame
    if kind == "gen":
        loss, _ = net(video, return_loss=True, video_contains_first_frame=vcff)
    else:
        loss, _ = net(video, return_discr_loss=True, apply_gradient_penalty=True, video_contains_first_frame=vcff)
    loss.backward()
    return grads(trainer.model)


def main() -> int:
    group = from_env(torch.device("cpu"), 60)
    cfg = compose(["+experiment=tiny", "trainer.num_threads=1"])
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp, group=group)
        trainer.net = wrap_ddp(trainer.model, group, trainer.device)
        assert trainer.net is not trainer.model, "no DDP wrapper with more than one rank"
        video = trainer.train_ds[group.rank].unsqueeze(0)  # a different clip on every rank
        report = {}
        for kind in ("gen", "discr"):
            rng = torch.get_rng_state()
            bare = run_pass(trainer, trainer.model, video, kind)
            torch.set_rng_state(rng)  # the same frame picks through DDP
            ddp = run_pass(trainer, trainer.net, video, kind)
            gathered = group.gather(bare)
            if not group.is_main:
                continue
            W = group.world_size
            bad, compared, differ_between_ranks = [], 0, 0
            for name, got in ddp.items():
                own = [g[name] for g in gathered]
                if all(o is None for o in own):
                    if got is not None and bool(got.count_nonzero()):
                        bad.append(f"{name}: no rank has a gradient, DDP gives a non-zero one")
                    continue
                own = [torch.zeros_like(got) if o is None else o for o in own]
                expected = own[0] / W
                for o in own[1:]:
                    expected = expected + o / W
                compared += 1
                differ_between_ranks += int(not torch.equal(own[0], own[1]))
                if got is None or not torch.equal(got.view(-1).view(torch.int32), expected.view(-1).view(torch.int32)):
                    n = "all" if got is None else int((got != expected).sum())
                    bad.append(f"{name}: {n} elements differ")
            report[kind] = {"compared": compared, "differ_between_ranks": differ_between_ranks, "mismatches": bad[:5]}
        if group.is_main:
            print("DDP_GRADS " + json.dumps(report), flush=True)
            ok = all(not r["mismatches"] and r["compared"] and r["differ_between_ranks"] for r in report.values())
        else:
            ok = True
    group.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
