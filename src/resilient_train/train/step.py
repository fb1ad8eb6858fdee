"""One optimizer step of the GAN tokenizer: the generator's micro-batches, the guard, the discriminator, the EMA.

:func:`gan_step` reads and updates the trainer's parts in the order the bits depend on; it is the
whole of what one step computes, and nothing else calls the model in training mode. Before each
optimizer's ``step()`` every rank agrees that the losses and the gradient norm are finite
(:func:`.faults.agree_finite`); a non-finite one raises :class:`.faults.Fault` on every rank with
nothing stepped, and the loop rolls back. Observers hear ``on_backward`` after the generator's
backward pass, before the guard (where chaos injects its ``nan``).
"""

from __future__ import annotations

from typing import Any

import torch

from .faults import agree_finite
from .ranks import sync_on_last

__all__ = ["gan_step"]


def gan_step(trainer: Any) -> dict[str, float]:
    """Step ``trainer`` (a :class:`~.trainer.Trainer`) once; the step's train metrics."""
    t = trainer
    m, o, g, step = t.cfg.model, t.cfg.optimizer, t.group, t.counters.step + 1
    vcff = m.video_contains_first_frame
    t.model.train()
    t.opt_gen.zero_grad(set_to_none=True)
    batches = [t.next_batch() for _ in range(t.accum)]
    loss_sum = recon_sum = 0.0
    for i, video in enumerate(batches):
        with sync_on_last(t.net, i == len(batches) - 1):
            loss, parts = t.net(video, return_loss=True, video_contains_first_frame=vcff)
            (loss / t.accum).backward()
        loss_sum += loss.item() / t.accum
        recon_sum += parts.recon_loss.item() / t.accum
    for obs in t.observers:
        obs.on_backward(t, step)
    gen_norm = float(torch.nn.utils.clip_grad_norm_(t.model.parameters(), o.max_grad_norm))
    agree_finite(g, step, {"loss": loss_sum, "grad_norm": gen_norm}, "generator loss or gradient norm")
    t.opt_gen.step()
    t.sched_gen.step()
    discr = None
    if m.use_gan:
        # One discriminator step per optimizer step, on the step's last micro-batch. Its grads
        # are zeroed first: the generator's adversarial loss also reached the discriminator.
        t.opt_discr.zero_grad(set_to_none=True)
        gp = t.counters.step % m.grad_penalty_every == 0
        last = batches[-1]
        dloss, _ = t.net(last, return_discr_loss=True, apply_gradient_penalty=gp, video_contains_first_frame=vcff)
        dloss.backward()
        discr = dloss.item()
        d_norm = float(torch.nn.utils.clip_grad_norm_(t.model.discr_parameters(), o.max_grad_norm))
        agree_finite(g, step, {"discr_loss": discr, "discr_grad_norm": d_norm}, "discriminator loss or gradient norm")
        t.opt_discr.step()
        t.sched_discr.step()
    if t.ema is not None:
        t.ema.update(t.counters.step)
    t.counters.step += 1
    return {
        "loss": loss_sum,
        "recon_loss": recon_sum,
        "discr_loss": discr,
        "grad_norm": gen_norm,
        "lr": t.sched_gen.get_last_lr()[0],
    }
