"""Encoders: tiny configs, weights sources, official-checkpoint import, layer taps."""

from __future__ import annotations

import pytest
import torch

from fsar.extract.encoders import (
    EncoderError,
    EncoderSpec,
    build_encoder,
    visual_state_from_checkpoint,
    weights_id,
)
from fsar.extract.layers import available_layers


@pytest.mark.parametrize("name, layer", [("fsar-tiny-vit", "block1"), ("fsar-tiny-rn", "stage3")])
def test_tiny_models_build_identically_in_every_process(name, layer):
    first = build_encoder(EncoderSpec(name), layers=[layer])
    second = build_encoder(EncoderSpec(name))
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        a = first.model.encode_image(images)
        b = second.model.encode_image(images)
    assert a.shape == (3, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert first.taps.pop()[layer].shape[0] == 3


def test_unknown_layer_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid: block0, block1"):
        build_encoder(EncoderSpec("fsar-tiny-vit"), layers=["block7"])
    rn = build_encoder(EncoderSpec("fsar-tiny-rn"))
    assert available_layers(rn.model.visual) == ["stage1", "stage2", "stage3", "stage4"]


def test_a_real_model_without_weights_names_the_file_to_pass():
    with pytest.raises(EncoderError, match="--weights FILE"):
        build_encoder(EncoderSpec("RN50"))
    with pytest.raises(EncoderError, match="unknown model 'RN51'"):
        build_encoder(EncoderSpec("RN51"))
    with pytest.raises(EncoderError, match="not found"):
        build_encoder(EncoderSpec("RN50", weights="no/such/file.pt"))


def test_local_weights_file_is_loaded_and_fingerprinted(tmp_path):
    source = build_encoder(EncoderSpec("fsar-tiny-vit"))
    with torch.no_grad():
        for parameter in source.model.parameters():
            parameter.add_(0.01)
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = build_encoder(EncoderSpec("fsar-tiny-vit", weights=str(path)))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.encode_image(images), source.model.encode_image(images)
        )
    assert weights_id(loaded.spec).startswith("file-sha256:")


def test_official_checkpoint_backbone_replaces_the_visual_encoder(tmp_path):
    tuned = build_encoder(EncoderSpec("fsar-tiny-rn"))
    with torch.no_grad():
        for parameter in tuned.model.visual.parameters():
            parameter.mul_(1.05)
    # The releases save {'model_state_dict': {backbone.*, head keys...}} with torch.save.
    state = {f"backbone.{k}": v for k, v in tuned.model.visual.state_dict().items()}
    state["context2.layers.0.0.norm.weight"] = torch.ones(4)
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": state, "epoch": 3}, path)
    assert set(visual_state_from_checkpoint(path)) == set(tuned.model.visual.state_dict())
    imported = build_encoder(EncoderSpec("fsar-tiny-rn", checkpoint=str(path)))
    assert imported.quick_gelu  # official checkpoints carry OpenAI CLIP (QuickGELU) encoders
    plain = build_encoder(EncoderSpec("fsar-tiny-rn", quick_gelu=True))
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(imported.model.visual(images), tuned.model.visual(images))
        assert not torch.allclose(imported.model.visual(images), plain.model.visual(images))
    assert "visual-from-checkpoint-sha256:" in imported.weights_id


def test_a_checkpoint_for_another_backbone_is_rejected(tmp_path):
    vit = build_encoder(EncoderSpec("fsar-tiny-vit"))
    path = tmp_path / "vit.pt"
    torch.save(
        {
            "model_state_dict": {
                f"backbone.{k}": v for k, v in vit.model.visual.state_dict().items()
            }
        },
        path,
    )
    with pytest.raises(EncoderError, match="do not fit"):
        build_encoder(EncoderSpec("fsar-tiny-rn", checkpoint=str(path)))
