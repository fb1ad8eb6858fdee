"""Hostile input to the tokenizer tools: a damaged export folder, a bad export source, an unusable output folder.

Each gets one sentence naming the file and what to do, exit 2 from the command line, no traceback and no
partial output. The folders are real exports of the shared tiny run, damaged here with plain file writes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, train_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import resilient_train
from resilient_train.checkpoint import committed
from resilient_train.tokenizer import export as export_tool

EXIT_CONFIG_ERROR = 2


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tok"
    assert export_tool.main([str(trained_run), "--out", str(out)]) == 0
    return out


def damaged(exported: Path, tmp_path: Path, config=None, weights=None, digest: bool = True) -> Path:
    """A copy of ``exported`` with ``config(dict) -> dict | bytes`` and ``weights(dict, path) -> None`` applied;
    ``digest=False``: without the weights' digest in config.json (an export from before it was recorded)."""
    tok = tmp_path / "tok"
    shutil.copytree(exported, tok)
    if not digest:
        cfg = json.loads((tok / "config.json").read_text())
        del cfg["weights_xxh3_128"]
        (tok / "config.json").write_text(json.dumps(cfg))
    if config is not None:
        new = config(json.loads((tok / "config.json").read_text()))
        (tok / "config.json").write_bytes(new if isinstance(new, bytes) else json.dumps(new).encode())
    if weights is not None:
        # Copies: load_file's tensors map the file, which the damage rewrites.
        tensors = {k: v.clone() for k, v in load_file(tok / "tokenizer.safetensors").items()}
        weights(tensors, tok / "tokenizer.safetensors")
    return tok


def kw(**changes):
    return lambda c: {**c, "kwargs": {**c["kwargs"], **changes}}


def drop_first(w, path):
    save_file(dict(list(w.items())[1:]), str(path))


def reshape_first(w, path):
    k = next(k for k, v in w.items() if v.dim() == 4 or v.dim() == 5)
    save_file({**w, k: torch.zeros(1, *w[k].shape[1:])}, str(path))


CONFIG_DAMAGE = [
    pytest.param(kw(warp_drive=True), 'kwargs=["warp_drive"]: are not VideoTokenizer arguments', id="unknown-key"),
    pytest.param(kw(init_dim="64"), 'kwargs.init_dim="64": must be an integer in 1..4096', id="wrong-type"),
    pytest.param(kw(init_dim=10**9), "kwargs.init_dim=1000000000: must be an integer in 1..4096", id="absurd-size"),
    pytest.param(kw(fsq_levels=[65536, 65536]), "kwargs.fsq_levels=[65536, 65536]: must be", id="huge-codebook"),
    pytest.param(kw(layers=["warp"]), 'kwargs.layers=["warp"]: must be a list of layer names', id="bad-layer"),
    pytest.param(kw(perceptual_loss_weight=0.1), "a perceptual loss would download VGG16", id="vgg"),
    pytest.param(lambda c: {**c, "clip": {**c["clip"], "image_size": 32}}, "clip.image_size=32: must equal", id="clip"),
    pytest.param(lambda c: {**c, "format": "other/9"}, "format 'other/9', this code reads", id="format"),
    pytest.param(lambda c: [c], "holds list, not a JSON object", id="not-an-object"),
    pytest.param(lambda c: b'{"format": ', "not valid JSON", id="truncated"),
    pytest.param(lambda c: b"[" * 100000 + b"]" * 100000, "not valid JSON", id="deep-nesting"),
    pytest.param(lambda c: b" " * (2 << 20), "bytes, more than a tokenizer config holds", id="huge-file"),
]
# With the digest every change is caught by it; without (an export from before it), by what it breaks.
WEIGHTS_DAMAGE = [
    pytest.param(lambda w, p: flip_byte(p, -100), True, "is not the one config.json records", id="bitflip"),
    pytest.param(lambda w, p: torch.save(w, p), True, "is not the one config.json records", id="pickle"),
    pytest.param(lambda w, p: torch.save(w, p), False, "not a readable safetensors file", id="pickle-no-digest"),
    pytest.param(lambda w, p: p.write_bytes(p.read_bytes()[:1000]), False, "not a readable safetensors", id="cut"),
    pytest.param(drop_first, False, "does not fit the model config.json describes: 1 missing", id="missing-tensor"),
    pytest.param(reshape_first, False, "of another shape", id="shape"),
    pytest.param(lambda w, p: p.unlink(), True, "tokenizer.safetensors: missing", id="absent"),
]


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("config, expected", CONFIG_DAMAGE)
def test_a_damaged_config_is_named_in_one_message(exported, tmp_path, config, expected):
    tok = damaged(exported, tmp_path, config=config)
    with pytest.raises(ValueError) as err:
        resilient_train.load_tokenizer(tok)
    assert expected in str(err.value) and str(tok / "config.json") in str(err.value)
    assert "re-export it" in str(err.value) or "not valid JSON" in str(err.value) or "bytes" in str(err.value)


@pytest.mark.parametrize("weights, digest, expected", WEIGHTS_DAMAGE)
def test_damaged_weights_are_named(exported, tmp_path, weights, digest, expected):
    tok = damaged(exported, tmp_path, weights=weights, digest=digest)
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        resilient_train.load_tokenizer(tok)
    assert expected in str(err.value) and str(tok / "tokenizer.safetensors") in str(err.value)


def test_the_tools_exit_2_without_a_traceback_and_write_nothing(exported, trained_run, tmp_path):
    tok = damaged(exported, tmp_path, weights=lambda w, p: torch.save(w, p))
    videos = tmp_path / "videos"
    videos.mkdir()
    from resilient_train.data import write_video

    write_video(videos / "a.mkv", torch.randint(0, 255, (5, 16, 16, 3), dtype=torch.uint8).numpy(), codec="ffv1")

    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, env=train_env()
        )

    out = tmp_path / "codes"
    runs = {
        "pickled weights": tool("resilient_train.tokenize", "--tokenizer", str(tok), str(videos), "--out", str(out)),
        "a folder without videos": tool(
            "resilient_train.evaluate", "--tokenizer", str(exported), "--data", str(tmp_path / "tok")
        ),
        "an --out under a file": tool(
            "resilient_train.tokenize", "--tokenizer", str(exported), str(videos), "--out", str(videos / "a.mkv" / "x")
        ),
    }
    for what, proc in runs.items():
        assert proc.returncode == EXIT_CONFIG_ERROR, (what, proc.stderr[-2000:])
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, (what, proc.stderr)
    assert "tokenizer.safetensors: its XXH3-128 is not the one config.json records" in runs["pickled weights"].stderr
    assert not out.exists()

    (out / "keep").mkdir(parents=True)
    again = tool("resilient_train.tokenize", "--tokenizer", str(exported), str(videos), "--out", str(out))
    assert again.returncode == EXIT_CONFIG_ERROR and "exists and is not an empty folder" in again.stderr
    assert [p.name for p in out.iterdir()] == ["keep"]


@pytest.mark.parametrize(
    "make, expected",
    [
        pytest.param(lambda run, tmp: tmp, "no committed checkpoint here", id="empty-folder"),
        pytest.param(
            lambda run, tmp: (tmp / "checkpoint_epoch_5.pt").write_bytes(b"\x80\x04junk") or tmp,
            "no committed checkpoint here",
            id="another-programs-folder",
        ),
        pytest.param(
            lambda run, tmp: shutil.copytree(committed(run / "checkpoints")[-1], tmp / ".tmp-step_00000020-1-2"),
            "an uncommitted temporary folder",
            id="temporary-folder",
        ),
    ],
)
def test_export_of_what_is_not_a_checkpoint_exits_2_naming_it(trained_run, tmp_path, capsys, make, expected):
    (tmp_path / "src").mkdir()
    source = make(trained_run, tmp_path / "src")
    assert export_tool.main([str(source), "--out", str(tmp_path / "out")]) == EXIT_CONFIG_ERROR
    err = capsys.readouterr().err
    assert expected in err and str(source) in err, err
    assert not (tmp_path / "out").exists()
    verify = subprocess.run(
        [sys.executable, "-m", "resilient_train.verify", str(source)], capture_output=True, text=True, cwd=REPO
    )
    assert verify.returncode in (1, 2) and "Traceback" not in verify.stderr


KEYS = st.sampled_from(["image_size", "init_dim", "channels", "layers", "fsq_levels", "num_codebooks", "attn_heads"])
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=5),
    st.lists(st.integers(-3, 10**6), max_size=4),
)
FUZZ = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def config_property(tok: Path, key: str, value) -> None:
    """A kwargs value of the wrong kind is refused naming config.json (or the weights that no longer fit), or loads."""
    shutil.copy(tok / "tokenizer.safetensors.orig", tok / "tokenizer.safetensors")
    cfg = json.loads((tok / "config.json.orig").read_text())
    cfg["kwargs"][key] = value
    (tok / "config.json").write_text(json.dumps(cfg))
    try:
        resilient_train.load_tokenizer(tok)
    except (ValueError, FileNotFoundError) as exc:
        assert str(tok / "config.json") in str(exc) or str(tok / "tokenizer.safetensors") in str(exc), exc


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "25")), **FUZZ)
@given(key=KEYS, value=VALUES)
def test_fuzzed_config_values_are_refused_by_name_or_load(exported_for_fuzz, key, value):
    config_property(exported_for_fuzz, key, value)


@pytest.mark.slow
@settings(max_examples=300, **FUZZ)
@given(key=KEYS, value=VALUES)
def test_fuzzed_config_values_many_examples(exported_for_fuzz, key, value):
    config_property(exported_for_fuzz, key, value)


@pytest.fixture(scope="module")
def exported_for_fuzz(exported, tmp_path_factory) -> Path:
    tok = tmp_path_factory.mktemp("fuzz") / "tok"
    shutil.copytree(exported, tok)
    shutil.copy(tok / "config.json", tok / "config.json.orig")
    shutil.copy(tok / "tokenizer.safetensors", tok / "tokenizer.safetensors.orig")
    return tok


def weights_property(tok: Path, data) -> None:
    """Any change to tokenizer.safetensors (cut, flipped, grown) is refused naming it: never a silently other model."""
    (tok / "config.json").write_bytes((tok / "config.json.orig").read_bytes())
    raw = bytearray((tok / "tokenizer.safetensors.orig").read_bytes())
    how = data.draw(st.sampled_from(["cut", "flip", "grow"]))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "cut":
        raw = raw[:at]
    elif how == "flip":
        raw[at] ^= 1 << data.draw(st.integers(0, 7))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=64))
    (tok / "tokenizer.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="tokenizer.safetensors: its XXH3-128 is not the one config.json records"):
        resilient_train.load_tokenizer(tok)


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20")), **FUZZ)
@given(data=st.data())
def test_fuzzed_weight_bytes_never_load(exported_for_fuzz, data):
    weights_property(exported_for_fuzz, data)


@pytest.mark.slow
@settings(max_examples=300, **FUZZ)
@given(data=st.data())
def test_fuzzed_weight_bytes_many_examples(exported_for_fuzz, data):
    weights_property(exported_for_fuzz, data)
