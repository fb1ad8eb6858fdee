"""One validation of what a checkpoint holds, shared by ``verify`` and by every resume.

:func:`~resilient_train.checkpoint.verify_files` proves that a checkpoint's files are the ones
written (sizes, hashes, safe parsing). Hashes prove nothing about content a user or a tool wrote
and then re-hashed, or that an older bug wrote: :func:`check_checkpoint` proves that the content
is a state this program can resume from, field by field, before anything is restored:

* the manifest's fields have their types (step, epoch, world size, metadata);
* ``state.json``: every required part is present; counters are integers in range and agree with
  the manifest; the saved config passes the schema and :func:`~resilient_train.config.validate_config`
  and hashes to the manifest's ``config_hash``; the environment has its keys and types;
* tensors: the model and EMA weights have exactly the keys, shapes and dtypes of the model the
  saved config builds, and are finite; each optimizer's state matches its parameters' shapes and
  its hyperparameters are numbers in range; each LR schedule is at the manifest's step;
* ``ranks/<r>``: every rank of the world size, each RNG state restorable (tried on throwaway
  generators) and each data position a pair of integers >= 0, the same on every rank.

Every problem is one line naming the file and the field. ``verify`` reports them (exit 1); an
automatic resume sets such a checkpoint aside and falls back to an older one; an explicit
``resume_from`` to it exits 2 (:mod:`.resume`).
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoint import Loaded
from ..checkpoint.manifest import MANIFEST, RANKS_DIR, STATE_JSON, STATE_TENSORS
from ..config import saved_config  # noqa: F401  (moved to config.schema; the old path resilient_train.checks keeps it)
from ..train.precision import scaler_problem

__all__ = ["check_checkpoint", "check_rng_state"]

_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int,),
    "batch_in_epoch": (int,),
    "val_loss": (int, float, type(None)),
    "val_weights": (str,),
    "config_hash": (str,),
    "versions": (dict,),
    "env": (dict,),
    "config_changes": (list,),
    "created": (int, float),
    "pid": (int,),
    "backend": (str,),
    "replicated_digest": (str,),
    "data_fingerprint": (str,),
    "global_batch": (int,),
}
_ENV_TYPES: dict[str, tuple[type, ...]] = {
    "torch": (str,),
    "num_threads": (int,),
    "cpu_capability": (str,),
    "device": (str,),
    "cuda_devices": (int,),
    "machine": (str,),
    "determinism_env": (dict,),
}


_ABSENT = object()  # a part missing from the state (reported once, by the list of missing parts)


def _is(value: Any, types: tuple[type, ...]) -> bool:
    """``isinstance`` where a bool is not an int (JSON's ``true`` is no step count)."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


def _int(value: Any, low: int = 0) -> bool:
    return _is(value, (int,)) and value >= low


class _Problems:
    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.lines: list[str] = []

    def add(self, file: str, field: str, problem: str) -> None:
        self.lines.append(f"{self.ckpt / file}: {field}: {problem}")


def check_checkpoint(loaded: Loaded) -> list[str]:
    """Every problem of a checkpoint read by ``verify_files``/``load_checkpoint``: ``[]`` when it can be resumed."""
    p = _Problems(Path(loaded.path))
    manifest, state = loaded.manifest, loaded.state
    step = manifest["step"]  # an int >= 0: read_manifest checked it
    for key, types in _MANIFEST_TYPES.items():
        if key in manifest and not _is(manifest[key], types):
            p.add(MANIFEST, key, f"{manifest[key]!r} is not a {'/'.join(t.__name__ for t in types)}")
    for key in ("epoch", "batch_in_epoch"):
        if _is(manifest.get(key), (int,)) and manifest[key] < 0:
            p.add(MANIFEST, key, f"{manifest[key]} is negative")
    missing = [
        k
        for k in ("model", "optim_gen", "optim_discr", "sched_gen", "sched_discr", "trainer", "config", "env")
        if k not in state
    ]
    if missing:
        p.add(STATE_JSON, "/", f"lacks {missing}")
    cfg = _check_config(p, state.get("config", _ABSENT), manifest)
    _check_counters(p, state.get("trainer", _ABSENT), step)
    _check_env(p, state.get("env", _ABSENT), manifest.get("env"))
    changes = state.get("config_changes", [])
    if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
        p.add(STATE_JSON, "config_changes", "is not a list of strings")
    _check_fingerprint(p, state.get("data_fingerprint"), manifest.get("data_fingerprint"))
    _check_ranks(p, state.get("ranks"), manifest.get("world_size", 1), manifest)
    if cfg is not None and not p.lines:  # tensors against the model the saved config builds
        _check_tensors(p, state, cfg, step)
    return p.lines


# -- state.json ------------------------------------------------------------------------------


def _check_config(p: _Problems, cfg: Any, manifest: dict[str, Any]) -> Any:
    """The saved config, schema-checked and validated (``None`` when it is not usable)."""
    from ..config import config_hash, validate_config

    if not isinstance(cfg, dict):
        if cfg is not _ABSENT:
            p.add(STATE_JSON, "config", f"is a {type(cfg).__name__}, not a mapping")
        return None
    try:
        merged = saved_config(cfg)
        validate_config(merged)
    except Exception as exc:  # omegaconf's validation errors, validate_config's ValueError, odd nesting
        p.add(STATE_JSON, "config", f"{type(exc).__name__}: {str(exc).strip()}")
        return None
    listed = manifest.get("config_hash")
    if isinstance(listed, str) and config_hash(merged) != listed:
        p.add(STATE_JSON, "config", f"does not hash to the manifest's config_hash {listed[:12]}… (edited?)")
        return None
    return merged


def _check_counters(p: _Problems, counters: Any, step: int) -> None:
    if not isinstance(counters, dict):
        if counters is not _ABSENT:
            p.add(STATE_JSON, "trainer", f"is a {type(counters).__name__}, not a mapping")
        return
    for key, low in (("step", 0), ("samples_seen", 0), ("best_step", -1)):
        if not _int(counters.get(key), low):
            p.add(STATE_JSON, f"trainer.{key}", f"{counters.get(key, '<absent>')!r} is not an integer >= {low}")
    if counters.get("step") != step and _int(counters.get("step")):
        p.add(STATE_JSON, "trainer.step", f"{counters['step']} != manifest step {step}")
    best_step = counters.get("best_step")
    if _int(best_step, -1) and best_step > step:
        p.add(STATE_JSON, "trainer.best_step", f"{best_step} is after the checkpoint's step {step}")
    best = counters.get("best_val_loss")
    if not _is(best, (int, float)) or math.isnan(best) or best == -math.inf:
        p.add(STATE_JSON, "trainer.best_val_loss", f"{best!r} is not a number (or +inf before any evaluation)")


def _check_env(p: _Problems, env: Any, listed: Any) -> None:
    if not isinstance(env, dict):
        if env is not _ABSENT:
            p.add(STATE_JSON, "env", f"is a {type(env).__name__}, not a mapping")
        return
    for key, types in _ENV_TYPES.items():
        if not _is(env.get(key), types):
            p.add(STATE_JSON, f"env.{key}", f"{env.get(key, '<absent>')!r} is not a {types[0].__name__}")
    if isinstance(listed, dict) and listed != env:
        p.add(STATE_JSON, "env", "differs from the manifest's env")


def _check_fingerprint(p: _Problems, fp: Any, listed: Any) -> None:
    if fp is None:
        return
    ok = isinstance(fp, dict) and isinstance(fp.get("digest"), str)
    for split in ("train", "val"):
        rows = fp.get(split, []) if isinstance(fp, dict) else None
        ok = ok and isinstance(rows, list) and all(isinstance(r, list) and r and isinstance(r[0], str) for r in rows)
    if not ok:
        p.add(STATE_JSON, "data_fingerprint", "malformed (expected digest and per-split lists of [path, ...])")
    elif isinstance(listed, str) and fp["digest"] != listed:
        p.add(STATE_JSON, "data_fingerprint.digest", "differs from the manifest's data_fingerprint")


def _check_schedule(p: _Problems, key: str, sched: Any, step: int, fresh: dict[str, Any]) -> None:
    """``fresh``: the state of the scheduler the trainer builds (its keys and flags are the only ones
    accepted: ``LambdaLR.load_state_dict`` sets every key it is given as an attribute)."""
    if not isinstance(sched, dict):
        p.add(STATE_JSON, key, f"is a {type(sched).__name__}, not a mapping")
        return
    if set(sched) != set(fresh):
        p.add(STATE_JSON, key, f"keys {sorted(sched)} are not the scheduler's {sorted(fresh)}")
        return
    if sched["last_epoch"] != step or not _int(sched["last_epoch"]):
        p.add(STATE_JSON, f"{key}.last_epoch", f"{sched['last_epoch']!r} != manifest step {step}")
    if not _int(sched["_step_count"]):
        p.add(STATE_JSON, f"{key}._step_count", f"{sched['_step_count']!r} is not an integer >= 0")
    for name, value in fresh.items():
        if isinstance(value, bool) and not isinstance(sched[name], bool):
            p.add(STATE_JSON, f"{key}.{name}", f"{sched[name]!r} is not a boolean")
    for lrs in ("base_lrs", "_last_lr"):
        v = sched[lrs]
        if not isinstance(v, list) or len(v) != 1 or not all(_is(x, (int, float)) and math.isfinite(x) for x in v):
            p.add(STATE_JSON, f"{key}.{lrs}", f"{v!r} is not one finite learning rate")
    lambdas = sched["lr_lambdas"]
    if not isinstance(lambdas, list) or len(lambdas) != 1 or not all(f is None or isinstance(f, dict) for f in lambdas):
        p.add(STATE_JSON, f"{key}.lr_lambdas", f"{lambdas!r} is not [None]")


def _check_ranks(p: _Problems, ranks: Any, world: int, manifest: dict[str, Any]) -> None:
    if not isinstance(ranks, dict):
        p.add(STATE_JSON, "ranks", "absent or not a mapping")
        return
    if set(ranks) != {str(r) for r in range(world)}:
        p.add(STATE_JSON, "ranks", f"per-rank state of ranks {sorted(map(str, ranks))}, but world_size {world}")
    positions = set()
    for r, own in sorted(ranks.items()):
        where = f"{RANKS_DIR}/{r}/{STATE_JSON}" if world > 1 or (p.ckpt / RANKS_DIR).is_dir() else STATE_JSON
        if not isinstance(own, dict):
            p.add(where, f"ranks/{r}", "is not a mapping")
            continue
        data = own.get("data")
        if not (isinstance(data, dict) and _int(data.get("epoch")) and _int(data.get("batch_in_epoch"))):
            p.add(where, "data", f"{data!r} is not {{epoch, batch_in_epoch}}, integers >= 0")
        else:
            positions.add((data["epoch"], data["batch_in_epoch"]))
        problem = check_rng_state(own.get("rng"))
        if problem:
            p.add(where, "rng", problem)
    if len(positions) > 1:
        p.add(RANKS_DIR, "data", f"the ranks disagree on the data position: {sorted(positions)}")
    listed = (manifest.get("epoch"), manifest.get("batch_in_epoch"))
    if len(positions) == 1 and all(_int(v) for v in listed) and positions != {listed}:
        p.add(MANIFEST, "epoch", f"the manifest's position {listed} is not the ranks' {positions.pop()}")


def check_rng_state(rng: Any) -> str | None:
    """Why a saved RNG state cannot be restored (tried on throwaway generators), or ``None``."""
    if not isinstance(rng, dict) or not all(k in rng for k in ("python", "numpy", "torch", "cuda")):
        return "not a mapping of python, numpy, torch and cuda states"
    try:
        py, np_ = rng["python"], rng["numpy"]
        state = py["state"]
        if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or state.dim() != 1:
            raise TypeError("python.state is not a 1-d int64 tensor")
        random.Random().setstate((int(py["version"]), tuple(int(v) for v in state.tolist()), py["gauss"]))
        key = np_["key"]
        if not isinstance(key, torch.Tensor) or key.dtype != torch.int64 or key.dim() != 1:
            raise TypeError("numpy.key is not a 1-d int64 tensor")
        if key.numel() and (int(key.min()) < 0 or int(key.max()) >= 2**32):
            raise ValueError("numpy.key holds values outside [0, 2**32)")
        for k in ("pos", "has_gauss"):
            if not _is(np_[k], (int,)):
                raise TypeError(f"numpy.{k} is not an integer")
        if not _is(np_["gauss"], (int, float)):
            raise TypeError("numpy.gauss is not a number")
        np.random.RandomState().set_state(
            {
                "bit_generator": np_["bit_generator"],
                "state": {"key": key.numpy().astype(np.uint32), "pos": np_["pos"]},
                "has_gauss": np_["has_gauss"],
                "gauss": float(np_["gauss"]),
            }
        )
        t = rng["torch"]
        if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8:
            raise TypeError("torch is not a uint8 tensor")
        torch.Generator().set_state(t)
        if not isinstance(rng["cuda"], list) or not all(
            isinstance(c, torch.Tensor) and c.dtype == torch.uint8 for c in rng["cuda"]
        ):
            raise TypeError("cuda is not a list of uint8 tensors")
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, IndexError) as exc:
        return f"cannot be restored ({type(exc).__name__}: {exc})"
    return None


# -- tensors ---------------------------------------------------------------------------------


def _check_tensors(p: _Problems, state: dict[str, Any], cfg: Any, step: int) -> None:
    from ..tokenizer.model import build_model, eval_copy

    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model)  # the shapes and dtypes every tensor must have (weights unused)
    expected = model.state_dict()
    _check_weights(p, "model.safetensors", "model", state.get("model"), expected)
    if cfg.trainer.ema.enabled:
        if "ema" not in state:
            p.add("ema.safetensors", "ema", "absent, but trainer.ema.enabled is true in the saved config")
        else:
            _check_weights(p, "ema.safetensors", "ema", state["ema"], eval_copy(model).state_dict())
    skipped = _skipped(p, state, cfg)
    o = cfg.optimizer
    for part, params, lr in (
        ("gen", list(model.parameters()), o.lr),
        ("discr", list(model.discr_parameters()), o.discr_lr),
    ):
        # What the trainer builds: the only keys and flags a loaded state may carry.
        opt = torch.optim.AdamW(params, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        # The discriminator is stepped only with the GAN on; without it its optimizer never holds state.
        steps = step - skipped.get(part, 0) if part == "gen" or cfg.model.use_gan else None
        shapes = [tuple(t.shape) for t in params]
        _check_optimizer(p, f"optim_{part}", state.get(f"optim_{part}"), shapes, steps, opt.state_dict())
        _check_schedule(p, f"sched_{part}", state.get(f"sched_{part}"), step, sched.state_dict())


def _skipped(p: _Problems, state: dict[str, Any], cfg: Any) -> dict[str, int]:
    """In ``16-mixed``: the scaler part restorable; the steps each optimizer skipped (its step count is less)."""
    problem = scaler_problem(state.get("scaler")) if cfg.trainer.precision == "16-mixed" else ""
    if problem:
        p.add(STATE_JSON, "scaler", problem)
    return dict(state["scaler"]["skipped"]) if problem is None else {}


def _check_weights(p: _Problems, file: str, part: str, weights: Any, expected: dict[str, torch.Tensor]) -> None:
    if not isinstance(weights, dict):
        p.add(file, part, "is not a mapping of tensors")
        return
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        p.add(file, part, f"keys differ from the model's: missing {missing[:5]}, unexpected {extra[:5]}")
        return
    for name, want in expected.items():
        got = weights[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            desc = f"{got.dtype}{tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            p.add(file, f"{part}/{name}", f"{desc}, the model has {want.dtype}{tuple(want.shape)}")
            return
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            p.add(file, f"{part}/{name}", "holds NaN or infinite values")
            return


def _check_optimizer(
    p: _Problems, key: str, opt: Any, shapes: list[tuple[int, ...]], step: int | None, fresh: dict[str, Any]
) -> None:
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
    ):
        p.add(STATE_JSON, key, "is not {state, param_groups}")
        return
    groups = opt["param_groups"]
    if len(groups) != 1 or not isinstance(groups[0], dict):
        p.add(STATE_JSON, f"{key}.param_groups", f"{len(groups)} groups, the trainer has 1")
        return
    g, want = groups[0], fresh["param_groups"][0]
    if set(g) != set(want):
        p.add(STATE_JSON, f"{key}.param_groups", f"keys {sorted(g)} are not the optimizer's {sorted(want)}")
        return
    flags = [k for k, v in want.items() if (v is None or isinstance(v, bool)) and g[k] != v]
    if flags:
        p.add(
            STATE_JSON, f"{key}.param_groups", f"{flags} differ from the trainer's optimizer ({[g[k] for k in flags]})"
        )
    if g.get("params") != list(range(len(shapes))):
        p.add(STATE_JSON, f"{key}.param_groups.params", f"does not list the model's {len(shapes)} parameters in order")
        return
    for h in ("lr", "eps", "weight_decay", "initial_lr"):
        if not _is(g.get(h), (int, float)) or not math.isfinite(g[h]) or g[h] < 0:
            p.add(STATE_JSON, f"{key}.param_groups.{h}", f"{g.get(h, '<absent>')!r} is not a finite number >= 0")
    betas = g.get("betas")
    if not (
        isinstance(betas, (list, tuple)) and len(betas) == 2 and all(_is(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        p.add(STATE_JSON, f"{key}.param_groups.betas", f"{betas!r} is not two numbers in [0, 1)")
    for idx, s in opt["state"].items():
        if not _is(idx, (int,)) or not 0 <= idx < len(shapes) or not isinstance(s, dict):
            p.add(STATE_JSON, f"{key}.state", f"entry {idx!r} is not one of the {len(shapes)} parameters")
            return
        if set(s) != {"step", "exp_avg", "exp_avg_sq"}:
            p.add(STATE_JSON, f"{key}.state.{idx}", f"keys {sorted(s)} are not AdamW's [exp_avg, exp_avg_sq, step]")
            return
        for name in ("exp_avg", "exp_avg_sq"):
            t = s.get(name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shapes[idx] or not t.is_floating_point():
                p.add(
                    STATE_TENSORS, f"{key}/state/{idx}/{name}", f"does not match parameter {idx}'s shape {shapes[idx]}"
                )
                return
            if not bool(torch.isfinite(t).all()):
                p.add(STATE_TENSORS, f"{key}/state/{idx}/{name}", "holds NaN or infinite values")
                return
        n = s.get("step")
        if not isinstance(n, torch.Tensor) or n.numel() != 1 or (step is not None and float(n) != step):
            p.add(STATE_TENSORS, f"{key}/state/{idx}/step", f"{n!r} != manifest step {step}")
            return
