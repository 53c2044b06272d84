"""Model directory round trips, refusal of damaged or foreign files, reference-checkpoint import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet
from safetensors.torch import load_file, save_file

from yoda.errors import ModelError
from yoda.model.checkpoint import (
    CARD_FILE,
    MODEL_FILE,
    RAW_FILE,
    ModelCard,
    convert_reference_checkpoint,
    load_model,
    map_reference_state_dict,
    read_card,
    save_model,
)
from yoda.model.network import Denoiser2p5D, NetworkConfig

# A small network with attention at a down/up level and in the middle block, so that every
# renamed tensor family (attention q/k/v/out, upsampler convs) occurs.
NET = NetworkConfig(
    preset="custom",
    channels=(8, 16, 16),
    attention_levels=(False, False, True),
    norm_num_groups=8,
    num_head_channels=16,
)


def _card(**kw) -> ModelCard:
    values = dict(
        sources=["t1w", "t2w"],
        target="flair",
        network=NET.to_dict(),
        n_slices=3,
        schedule="linear",
        T=1000,
        prediction="v",
        normalization={"method": "percentile", "percentile": 99.9},
        training={"subjects": 3, "voxel_sizes": [[3.0, 3.0, 3.0]]},
        steps=7,
        wall_time_s=1.5,
        notes="yoda train --preset tiny",
    )
    values.update(kw)
    return ModelCard(**values)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random values in every tensor (MONAI zero-initializes some layers, e.g. the output conv,
    which would make outputs of untrained models trivially equal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _model(seed: int) -> Denoiser2p5D:
    return _randomize(Denoiser2p5D(NET, n_slices=3, n_sources=2), seed)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    cond = torch.randn(2, 6, 16, 16, generator=g)
    t = torch.tensor([3, 900])
    return x, t, cond


def _out(model, seed=0):
    x, t, cond = _inputs(seed)
    with torch.no_grad():
        out = model.eval()(x, t, cond)
    assert out.abs().min() > 0  # a non-degenerate output
    return out


@pytest.fixture()
def model_dir(tmp_path: Path) -> tuple[Path, Denoiser2p5D, Denoiser2p5D]:
    raw, ema = _model(0), _model(1)
    directory = save_model(tmp_path / "model", raw, ema, _card())
    return directory, raw, ema


def test_round_trip_weights_card_and_outputs(model_dir):
    directory, raw, ema = model_dir
    assert sorted(p.name for p in directory.iterdir()) == sorted([MODEL_FILE, RAW_FILE, CARD_FILE])
    loaded, card = load_model(directory)
    assert card == _card()
    assert not loaded.training
    for name, tensor in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.equal(_out(loaded), _out(ema))
    loaded_raw, _ = load_model(directory, weights="raw")
    assert torch.equal(_out(loaded_raw), _out(raw))
    assert not torch.equal(_out(loaded_raw), _out(loaded))


def test_save_unwraps_wrappers_and_leaves_no_temporary_files(tmp_path):
    model = _model(0)
    wrapped = torch.nn.DataParallel(model)  # same unwrapping path as DistributedDataParallel
    directory = save_model(tmp_path / "m", wrapped, None, _card())
    names = set(load_file(str(directory / MODEL_FILE)))
    assert names == set(model.state_dict())  # no "module." prefix
    assert all(not n.startswith("module.") for n in names)
    assert sorted(p.name for p in directory.iterdir()) == sorted([MODEL_FILE, RAW_FILE, CARD_FILE])
    loaded, _ = load_model(directory)
    assert torch.equal(_out(loaded), _out(model))


def test_missing_directory_and_files(tmp_path, model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    directory, _, _ = model_dir
    (directory / MODEL_FILE).unlink()
    with pytest.raises(ModelError, match="model.safetensors is missing"):
        load_model(directory)
    load_model(directory, weights="raw")  # the other weights still load
    (directory / CARD_FILE).unlink()
    with pytest.raises(ModelError, match="model.json is missing"):
        load_model(directory, weights="raw")


def test_corrupted_weights_are_a_model_error(model_dir):
    directory, _, _ = model_dir
    path = directory / MODEL_FILE
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # absurd header length
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="corrupted or not a safetensors file"):
        load_model(directory)
    path.write_bytes(b"\x00" * 5)  # truncated
    with pytest.raises(ModelError, match="corrupted"):
        load_model(directory)


def test_foreign_or_mismatched_tensors_are_refused(model_dir):
    directory, raw, _ = model_dir
    path = directory / MODEL_FILE
    save_file({"encoder.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(ModelError, match="does not hold the weights"):
        load_model(directory)
    # the right names, one wrong shape (e.g. weights of a model with other sources)
    state = {k: v.clone() for k, v in raw.state_dict().items()}
    state["unet.conv_in.conv.weight"] = torch.zeros(8, 5, 3, 3)
    save_file(state, str(path))
    with pytest.raises(ModelError, match="has shape"):
        load_model(directory)
    state = {k: v.clone() for k, v in raw.state_dict().items()}
    state["unet.out.2.conv.bias"] = torch.tensor([float("nan")])
    save_file(state, str(path))
    with pytest.raises(ModelError, match="NaN"):
        load_model(directory)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format_version": 2}, "unknown format_version 2"),
        ({"format_version": "1"}, "format_version"),
        ({"T": "1000"}, "'T' has the wrong type"),
        ({"T": 10**12}, r"T must be in 1\.\.100000, got T=1000000000000"),
        ({"T": 0}, r"T must be in 1\.\.100000"),
        ({"sources": "t1w"}, "'sources' has the wrong type"),
        ({"steps": 1.5}, "'steps'"),
        ({"prediction": "score"}, "unknown prediction"),
        ({"network": {"channels": [8, 16, 16], "colour": "red"}}, "invalid network"),
        ({"extra": 1}, "unknown keys"),
    ],
)
def test_bad_model_cards(model_dir, change, message):
    directory, _, _ = model_dir
    path = directory / CARD_FILE
    data = json.loads(path.read_text())
    data.update(change)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        load_model(directory)


@pytest.mark.parametrize(
    ("target", "normalization", "expected"),
    [
        ("flair", {"method": "tissue"}, "tissue"),
        ("flair", {"method": "ct"}, "ct"),
        ("ct", {"method": "tissue"}, "ct"),  # a CT target is on the CT window by default
        ("ct", {"method": "tissue", "modalities": {"ct": "ct"}}, "ct"),
        ("ct", {"method": "percentile", "modalities": {"ct": "tissue"}}, "tissue"),
    ],
)
def test_target_normalization_resolves_the_target(target, normalization, expected):
    assert _card(target=target, normalization=normalization).target_normalization == expected


def test_card_with_an_unknown_target_normalization_is_refused(model_dir):
    directory, _, _ = model_dir
    path = directory / CARD_FILE
    data = json.loads(path.read_text())
    data["normalization"] = {"method": "tissue", "modalities": {data["target"]: "zscore"}}
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="'zscore'"):
        read_card(directory)


def test_card_missing_key_and_not_json(model_dir):
    directory, _, _ = model_dir
    path = directory / CARD_FILE
    data = json.loads(path.read_text())
    del data["target"]
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="missing keys"):
        read_card(directory)
    path.write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        read_card(directory)


# ------------------------------------------------------------------------------------------
# reference checkpoints


def _to_old_format(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert MONAI's load_old_state_dict renaming (new key -> MONAI Generative key)."""
    old = {}
    for key, value in state.items():
        name = key
        for part in ("to_q", "to_k", "to_v"):
            name = name.replace(f".attn.{part}.", f".{part}.")
        name = name.replace(".attn.out_proj.", ".proj_attn.")
        name = name.replace("postconv", "conv")
        old[name] = value.clone()
    return old


def test_old_format_fixture_is_what_monai_reads(tmp_path):
    """The inverted dict really is MONAI Generative's format: MONAI's own loader reads it."""
    model = _model(0)
    old = _to_old_format(model.unet.state_dict())
    assert any(".proj_attn." in k for k in old) and any(".to_q." in k for k in old)
    assert not any(".attn." in k or "postconv" in k for k in old)
    fresh = DiffusionModelUNet(**NET.unet_kwargs(in_channels=9))
    fresh.load_old_state_dict(dict(old))
    for k, v in model.unet.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    mapped = map_reference_state_dict(old, fresh)
    assert set(mapped) == set(model.unet.state_dict())
    assert all(torch.equal(mapped[k], v) for k, v in model.unet.state_dict().items())


@pytest.mark.parametrize("layout", ["flat", "nested"])
def test_convert_reference_checkpoint_gives_identical_outputs(tmp_path, layout):
    raw, ema = _model(0), _model(1)
    old_raw = _to_old_format(raw.unet.state_dict())
    old_ema = _to_old_format(ema.unet.state_dict())
    if layout == "flat":
        payload = old_ema
        expected_raw = ema
    else:  # DDP prefixes, raw weights under "model", EMA under "ema", plus training state
        payload = {
            "model": {f"module.{k}": v for k, v in old_raw.items()},
            "ema": {"state_dict": old_ema},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]},
            "global_step": 1234,
        }
        expected_raw = raw
    ckpt = tmp_path / "last.pth"
    torch.save(payload, ckpt)
    out = convert_reference_checkpoint(
        ckpt,
        tmp_path / "converted",
        sources=["t1w", "t2w"],
        target="flair",
        network=NET,
        n_slices=3,
    )
    loaded, card = load_model(out)
    assert torch.equal(_out(loaded), _out(ema))
    assert torch.equal(_out(loaded, seed=1), _out(ema, seed=1))
    loaded_raw, _ = load_model(out, weights="raw")
    assert torch.equal(_out(loaded_raw), _out(expected_raw))
    assert card.sources == ["t1w", "t2w"] and card.target == "flair"
    assert card.prediction == "v" and card.T == 1000 and card.n_slices == 3
    assert card.steps == (1234 if layout == "nested" else 0)
    assert len(card.training["checkpoint_sha256"]) == 64


def test_convert_refuses_a_checkpoint_of_another_network(tmp_path):
    ckpt = tmp_path / "ref.pt"
    torch.save(_to_old_format(_model(0).unet.state_dict()), ckpt)
    with pytest.raises(ModelError, match="input channels"):  # 2 sources + n=3 -> 9, not 15
        convert_reference_checkpoint(
            ckpt, tmp_path / "a", sources=["t1w", "t2w"], target="flair", network=NET, n_slices=5
        )
    with pytest.raises(ModelError, match="check --preset"):
        convert_reference_checkpoint(
            ckpt,
            tmp_path / "b",
            sources=["t1w", "t2w"],
            target="flair",
            network="tiny",
            n_slices=3,
        )
    torch.save({"weights": {"fc.weight": torch.zeros(2, 2)}}, ckpt)
    with pytest.raises(ModelError, match="no DiffusionModelUNet state dict"):
        convert_reference_checkpoint(
            ckpt, tmp_path / "c", sources=["t1w", "t2w"], target="flair", network=NET, n_slices=3
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


class _Payload:
    """Unpickling this object would create a file (an attack through a checkpoint)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused_and_does_not_run(tmp_path):
    target = tmp_path / "pwned.txt"
    ckpt = tmp_path / "evil.pt"
    state = _to_old_format(_model(0).unet.state_dict())
    torch.save({"model": state, "hook": _Payload(str(target))}, ckpt)
    assert not target.exists()
    with pytest.raises(ModelError, match="refused to load"):
        convert_reference_checkpoint(
            ckpt,
            tmp_path / "out",
            sources=["t1w", "t2w"],
            target="flair",
            network=NET,
            n_slices=3,
        )
    assert not target.exists()
    assert not (tmp_path / "out").exists()


def test_convert_command_line(tmp_path, capsys):
    from yoda.cli import main

    model = _randomize(Denoiser2p5D("tiny", n_slices=1, n_sources=1), 3)
    ckpt = tmp_path / "ref.pt"
    torch.save({"state_dict": _to_old_format(model.unet.state_dict())}, ckpt)
    out = tmp_path / "model"
    assert _convert(ckpt, out, sources=("T1w",)) == 0, capsys.readouterr().err
    loaded, card = load_model(out)
    assert card.sources == ["t1w"] and card.network["preset"] == "tiny"
    assert "convert" in card.notes
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        expected = model.eval()(x, 5, x)
        assert expected.abs().min() > 0
        assert torch.equal(loaded(x, 5, x), expected)
    code = main(
        [
            "convert",
            "--checkpoint",
            str(tmp_path / "none.pt"),
            "--sources",
            "t1w",
            "--target",
            "flair",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 1
    assert "does not exist" in capsys.readouterr().err


def _tiny_reference(tmp_path: Path, seed: int = 3, name: str = "ref.pt") -> Path:
    """A reference checkpoint of the tiny preset (one source, n = 1)."""
    model = _randomize(Denoiser2p5D("tiny", n_slices=1, n_sources=1), seed)
    ckpt = tmp_path / name
    torch.save({"state_dict": _to_old_format(model.unet.state_dict())}, ckpt)
    return ckpt


def _convert(ckpt: Path, out: Path, *extra: str, sources=("t1w",), target="flair") -> int:
    from yoda.cli import main

    return main(
        [
            "convert",
            "--checkpoint",
            str(ckpt),
            "--sources",
            *sources,
            "--target",
            target,
            "--preset",
            "tiny",
            "--n-slices",
            "1",
            "--out",
            str(out),
            *extra,
        ]
    )


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("yoda convert: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    ("sources", "target", "message"),
    [
        (("t1w", "t1w"), "flair", "duplicates"),
        (("T1 w", "t2w"), "flair", "lower-case words, got 't1 w'"),
        (("t1w",), "t1w", "'t1w' is also a source"),
        (("t1w",), "../x", "lower-case words, got '../x'"),
    ],
)
def test_convert_refuses_unusable_modality_names(tmp_path, capsys, sources, target, message):
    out = tmp_path / "model"
    assert _convert(_tiny_reference(tmp_path), out, sources=sources, target=target) == 1
    assert message in _error(capsys)
    assert not out.exists()


def test_convert_refuses_an_output_that_is_a_file(tmp_path, capsys):
    ckpt = _tiny_reference(tmp_path)
    out = tmp_path / "model.txt"
    out.write_text("keep me")
    assert _convert(ckpt, out) == 1
    assert "exists and is not a folder" in _error(capsys)
    assert _convert(ckpt, out, "--force") == 1
    assert "exists and is not a folder" in _error(capsys)
    assert _convert(ckpt, out / "sub") == 1
    assert "its parent cannot be made or written to" in _error(capsys)
    assert out.read_text() == "keep me"


def test_convert_refuses_a_non_empty_output_folder_unless_forced(tmp_path, capsys):
    out = tmp_path / "model"
    out.mkdir()  # an empty folder is fine
    assert _convert(_tiny_reference(tmp_path, seed=3), out) == 0, capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "README").write_text("mine")
    other = _tiny_reference(tmp_path, seed=4, name="other.pt")
    assert _convert(other, out) == 1
    assert "not empty; pass --force" in _error(capsys)
    assert all((out / name).read_bytes() == data for name, data in before.items())
    # refused before any work: a missing checkpoint is not even looked at
    assert _convert(tmp_path / "none.pt", out) == 1
    assert "not empty" in _error(capsys)
    assert _convert(other, out, "--force") == 0, capsys.readouterr().err
    assert (out / MODEL_FILE).read_bytes() != before[MODEL_FILE]
    assert (out / "README").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MODEL_FILE, RAW_FILE, CARD_FILE, "README"]
    )
    assert read_card(out).training["checkpoint"] == str(other.resolve())


def test_convert_failure_while_writing_leaves_no_output(tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def failing_save_file(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    ckpt = _tiny_reference(tmp_path)
    with pytest.raises(OSError, match="No space"):
        convert_reference_checkpoint(
            ckpt, tmp_path / "model", sources=["t1w"], target="flair", network="tiny", n_slices=1
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.pt"]


def test_convert_checkpoint_that_is_a_folder(tmp_path, capsys):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    assert _convert(folder, tmp_path / "model") == 1
    assert "is a folder, not a checkpoint file" in _error(capsys)


def test_convert_bounds_T(tmp_path, capsys):
    ckpt = _tiny_reference(tmp_path)
    out = tmp_path / "model"
    for bad in ("1000000000000", "0"):
        assert _convert(ckpt, out, "--T", bad) == 1
        assert "T must be an integer in 1..100000" in _error(capsys)
    assert not out.exists()
    assert _convert(ckpt, out, "--T", "100000") == 0, capsys.readouterr().err
    assert read_card(out).T == 100000
