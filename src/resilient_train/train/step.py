"""One optimizer step of the GAN tokenizer: the generator's micro-batches, the guard, the discriminator, the EMA.

:func:`gan_step` reads and updates the trainer's parts in the order the bits depend on; it is the
whole of what one step computes, and nothing else calls the model in training mode. The forward
passes and losses run under the trainer's precision (:mod:`.precision`: autocast, and in
``16-mixed`` a gradient scaler per optimizer). Before each optimizer's ``step()`` every rank agrees
that the loss and the gradient norm are finite (:func:`.faults.agree_finite`); a non-finite one
raises :class:`.faults.Fault` on every rank with nothing stepped, and the loop rolls back. In
``16-mixed`` non-finite gradients are the scaler's to handle (an overflow: it skips the step and
lowers its scale, and the skip is counted), so there the guard watches the losses alone. Observers
hear ``on_backward(trainer, step, values)`` after the generator's backward pass, before the guard
(where chaos injects its ``nan``: into a gradient, or in ``16-mixed`` into the loss it reports).
"""

from __future__ import annotations

from typing import Any

import torch

from .faults import agree_finite
from .ranks import sync_on_last

__all__ = ["gan_step"]


def gan_step(trainer: Any) -> dict[str, Any]:
    """Step ``trainer`` (a :class:`~.trainer.Trainer`) once; the step's train metrics."""
    t = trainer
    m, o, g, p, step = t.cfg.model, t.cfg.optimizer, t.group, t.precision, t.counters.step + 1
    vcff = m.video_contains_first_frame
    t.model.train()
    t.opt_gen.zero_grad(set_to_none=True)
    batches = [t.next_batch() for _ in range(t.accum)]
    loss_sum = recon_sum = 0.0
    for i, video in enumerate(batches):
        with sync_on_last(t.net, i == len(batches) - 1):
            with p.autocast():
                loss, parts = t.net(video, return_loss=True, video_contains_first_frame=vcff)
            p.backward(loss / t.accum, "gen")
        loss_sum += loss.item() / t.accum
        recon_sum += parts.recon_loss.item() / t.accum
    values = {"loss": loss_sum}
    for obs in t.observers:
        obs.on_backward(t, step, values)
    p.unscale(t.opt_gen, "gen")
    gen_norm = float(torch.nn.utils.clip_grad_norm_(t.model.parameters(), o.max_grad_norm))
    agree_finite(g, step, values if p.scaled else {**values, "grad_norm": gen_norm}, "generator loss or gradient norm")
    p.step(t.opt_gen, "gen")
    t.sched_gen.step()
    discr = None
    if m.use_gan:
        # One discriminator step per optimizer step, on the step's last micro-batch. Its grads
        # are zeroed first: the generator's adversarial loss also reached the discriminator.
        t.opt_discr.zero_grad(set_to_none=True)
        gp = t.counters.step % m.grad_penalty_every == 0
        last = batches[-1]
        with p.autocast():
            dloss, _ = t.net(last, return_discr_loss=True, apply_gradient_penalty=gp, video_contains_first_frame=vcff)
        p.backward(dloss, "discr")
        discr = dloss.item()
        p.unscale(t.opt_discr, "discr")
        d_norm = float(torch.nn.utils.clip_grad_norm_(t.model.discr_parameters(), o.max_grad_norm))
        d_values = {"discr_loss": discr} | ({} if p.scaled else {"discr_grad_norm": d_norm})
        agree_finite(g, step, d_values, "discriminator loss or gradient norm")
        p.step(t.opt_discr, "discr")
        t.sched_discr.step()
    if t.ema is not None:
        t.ema.update(t.counters.step)
    t.counters.step += 1
    out = {
        "loss": loss_sum,
        "recon_loss": recon_sum,
        "discr_loss": discr,
        "grad_norm": gen_norm,
        "lr": t.sched_gen.get_last_lr()[0],
    }
    if p.scaled:  # the fp16 scalers: the generator's scale, and the steps each skipped so far
        out |= {"scale": p.scalers["gen"].get_scale(), "skipped": dict(p.skipped)}
    return out
