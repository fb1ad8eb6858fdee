"""``trainer.compile``: ``torch.compile`` of the generator's encoder and decoder layers, and its prerequisites.

What is compiled, and why that and no more:

* every layer of ``encoder_layers`` and ``decoder_layers`` (the convolutions, residual and attention
  blocks that hold nearly all of a step's arithmetic), each with ``Module.compile(dynamic=False)``.
  ``Module.compile`` compiles in place: the module keeps its own ``state_dict()`` keys, so checkpoints
  and exports never carry an ``OptimizedModule``'s ``_orig_mod.`` prefix, and a checkpoint written with
  compile resumes without it and the other way round. ``dynamic=False``: the discriminator's pass
  calls the same layers with other shapes, and inductor's dynamic-shape kernels failed on them here
  (``cannot determine truth value of Relational``); one static graph per shape compiles and runs.
* not the discriminator: its gradient penalty takes a double backward (``autograd.grad`` with
  ``create_graph=True``), which a compiled graph refuses (``torch.compile with aot_autograd does not
  currently support double backward``); not the whole ``forward``: it draws the GAN's frames from the
  global RNG, which inductor's own random kernels would replace with another stream.
* after the EMA's copy is made, and never before a ``deepcopy``: a compiled module keeps a compiled
  *bound method of itself*, which a deep copy shares, so a copy would run the original's layers.

The compiled layers compute the same function with the floating-point operations in another order,
so a compiled run's bits differ from an eager run's; runs with the same setting are compared. A
resume may switch it (``trainer.compile`` is resume-safe, like the device: a speed choice, and the
bits then follow the new setting).
"""

from __future__ import annotations

import logging

import torch

__all__ = ["COMPILED_LAYERS", "check_compile", "compile_generator"]

#: The ``VideoTokenizer`` module lists whose layers are compiled.
COMPILED_LAYERS = ("encoder_layers", "decoder_layers")

log = logging.getLogger(__name__)


def check_compile(device: torch.device) -> None:
    """Raise ``ValueError`` (exit 2) when ``torch.compile`` cannot build kernels for ``device``, saying why."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ValueError(
                "trainer.compile=true on cuda needs triton (pip install triton matching torch); "
                "or set trainer.compile=false"
            )
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError, OSError) as err:
        raise ValueError(
            f"trainer.compile=true on {device.type} needs a C++ compiler (g++ or clang++ on PATH, or CXX): "
            f"{err}; install one (apt install g++) or set trainer.compile=false"
        ) from err


def compile_generator(model: torch.nn.Module) -> torch.nn.Module:
    """Compile ``model``'s encoder and decoder layers in place (once: a layer already compiled is left as it is);
    ``model`` itself, its keys unchanged."""
    layers = [layer for name in COMPILED_LAYERS for layer in getattr(model, name)]
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=False)
    log.info("train.compile layers=%d of=%s dynamic=false", len(layers), ",".join(COMPILED_LAYERS))
    return model
