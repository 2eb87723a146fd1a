"""The heads reproduce the official releases' outputs and gradients (../shared/golden)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.heads import CLIPFSARHead, CLIPSPMHead, episode_loss, load_official, official_key_map
from fsar.torch_files import CheckpointError

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden"
CLIPSPM = sorted(p.stem for p in GOLDEN.glob("clipspm_*.json"))
CLIPFSAR = sorted(p.stem for p in GOLDEN.glob("clipfsar_*.json"))
DTYPES = [torch.float32, torch.float64]

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden vectors not found at {GOLDEN}")


def load_golden(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    settings = json.loads((GOLDEN / f"{name}.json").read_text())
    with np.load(GOLDEN / f"{name}.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return settings, arrays


def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(a))
    return t.to(dtype) if t.is_floating_point() else t.long()


def episode_class_text(
    table: torch.Tensor, labels: torch.Tensor, class_ids: torch.Tensor
) -> torch.Tensor:
    """[N, D]: row n = table row of the dataset class that episode label n stands for."""
    n_way = int(labels.max()) + 1
    ids = torch.full((n_way,), -1, dtype=torch.long)
    ids[labels] = class_ids
    assert (ids >= 0).all()
    return table[ids]


def official_params(arrays: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        k[len("param.") :]: tensor(v, dtype) for k, v in arrays.items() if k.startswith("param.")
    }


def assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float, what: str):
    expected_t = torch.from_numpy(np.asarray(expected)).to(actual.dtype)
    assert actual.shape == expected_t.shape, (
        f"{what}: shape {list(actual.shape)} vs {list(expected_t.shape)}"
    )
    torch.testing.assert_close(
        actual.detach(), expected_t, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def assert_grads(head: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Every grad.<official key> matches, relative to the largest entry of that gradient."""
    key_map = official_key_map(head)
    params = dict(head.named_parameters())
    for key, expected in arrays.items():
        if not key.startswith("grad."):
            continue
        official = key[len("grad.") :]
        ours = key_map.get(official)
        grad = None if ours is None else params[ours].grad
        if grad is None:  # a parameter the official outputs do not use
            assert np.abs(expected).max() == 0, (
                f"{official}: official grad is non-zero but head has none"
            )
            continue
        scale = max(float(np.abs(expected).max()), 1e-6)
        assert_close(grad, expected, rtol=1e-4, atol=1e-4 * scale, what=key)


def build_clipspm(settings: dict, dtype: torch.dtype) -> CLIPSPMHead:
    p = settings["params"]
    head = CLIPSPMHead(
        settings["D"],
        heads=settings["heads"],
        dim_head=settings["dim_head"],
        mlp_dim=settings["mlp"],
        prompt_hidden=settings["tok_hidden"],
        gate_text_ratio=p["mid_dim_text"],
        gate_vision_ratio=p["mid_dim_vision"],
        negative_slope=p["negative_slope"],
        fusion_alpha=p["alpha"],
        motion_alpha_learnable=True,
    )
    return head.to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", CLIPSPM)
def test_clipspm_matches_official_outputs_and_gradients(name, dtype):
    settings, arrays = load_golden(name)
    head = build_clipspm(settings, dtype)
    load_official(head, official_params(arrays, dtype))
    support = tensor(arrays["input.support_features"], dtype)[None]
    query = tensor(arrays["input.query_features"], dtype)[None]
    support_labels = tensor(arrays["input.support_labels"], dtype)[None]
    query_labels = tensor(arrays["input.query_labels"], dtype)[None]
    class_text = episode_class_text(
        tensor(arrays["input.class_text_features"], dtype),
        support_labels[0],
        tensor(arrays["input.support_class_ids"], dtype),
    )[None]

    out = head(support, support_labels, query, class_text, query_labels=query_labels)
    loss = episode_loss(out, query_labels, {"motion_consistency": 0.001})
    loss.backward()

    assert_close(out.logits[0], arrays["output.logits"], 1e-5, 2e-5, "output.logits")
    assert_close(
        out.aux["motion_consistency"],
        arrays["output.motion_consistency"],
        1e-5,
        1e-5,
        "output.motion_consistency",
    )
    assert_close(loss, arrays["output.loss"], 1e-5, 1e-5, "output.loss")
    assert_grads(head, arrays)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", CLIPFSAR)
def test_clipfsar_matches_official_outputs_and_gradients(name, dtype):
    settings, arrays = load_golden(name)
    head = CLIPFSARHead(
        settings["D"], mlp_dim=settings["mlp"], merge_before=bool(settings["merge_before"])
    )
    head = head.to(dtype).eval()
    load_official(head, official_params(arrays, dtype))
    support = tensor(arrays["input.support_features"], dtype)[None]
    query = tensor(arrays["input.query_features"], dtype)[None]
    support_labels = tensor(arrays["input.support_labels"], dtype)[None]
    query_labels = tensor(arrays["input.query_labels"], dtype)[None]
    support_ids = tensor(arrays["input.support_class_ids"], dtype)[None]
    query_ids = tensor(arrays["input.query_class_ids"], dtype)[None]
    train_table = tensor(arrays["input.class_text_features_train"], dtype)
    class_text = episode_class_text(
        tensor(arrays["input.class_text_features_eval"], dtype), support_labels[0], support_ids[0]
    )[None]

    out = head(
        support,
        support_labels,
        query,
        class_text,
        query_labels=query_labels,
        support_class_ids=support_ids,
        query_class_ids=query_ids,
        text_table=train_table,
    )
    loss = episode_loss(out, query_labels, {"video_text": settings["video_text_loss_weight"]})
    loss.backward()

    videos = torch.cat([support, query], dim=1)
    assert_close(out.logits[0], arrays["output.logits"], 1e-5, 2e-5, "output.logits")
    assert_close(
        head.video_text_logits(videos, train_table)[0],
        arrays["output.video_text_logits"],
        1e-5,
        1e-5,
        "output.video_text_logits",
    )
    assert_close(loss, arrays["output.loss"], 1e-5, 1e-5, "output.loss")
    assert_grads(head, arrays)


@pytest.mark.parametrize("name", CLIPSPM + CLIPFSAR)
def test_official_keys_round_trip_through_the_head(name):
    from fsar.heads import to_official

    settings, arrays = load_golden(name)
    if name.startswith("clipspm"):
        head = build_clipspm(settings, torch.float32)
    else:
        head = CLIPFSARHead(
            settings["D"], mlp_dim=settings["mlp"], merge_before=bool(settings["merge_before"])
        )
    params = official_params(arrays, torch.float32)
    load_official(head, params)
    back = to_official(head)
    assert sorted(back) == sorted(params)
    for key, value in params.items():
        if key == "scale" and name.startswith("clipspm"):
            continue  # unused by CLIP-SPM: written back with its initial value
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)


def _spm_head_and_params():
    settings, arrays = load_golden("clipspm_5w1s")
    return build_clipspm(settings, torch.float32), official_params(arrays, torch.float32)


def test_load_official_reads_a_release_checkpoint_and_ignores_the_backbone(tmp_path):
    head, params = _spm_head_and_params()
    state = dict(params, **{"backbone.conv1.weight": torch.zeros(3)})
    path = tmp_path / "checkpoint.pt"
    torch.save({"model_state_dict": state, "epoch": 3}, path)
    assert load_official(head, path) == []
    torch.testing.assert_close(head.fusion.text_gate.fc1.weight, params["gate_text.0.weight"])
    assert head.motion_alpha.item() == pytest.approx(params["mo_alpha1"].item())


def test_load_official_names_unknown_and_missing_keys():
    head, params = _spm_head_and_params()
    with pytest.raises(CheckpointError, match="context3.weight"):
        load_official(head, dict(params, **{"context3.weight": torch.zeros(1)}))
    partial = {k: v for k, v in params.items() if k != "gate_vision.2.bias"}
    with pytest.raises(CheckpointError, match="fusion.vision_gate.fc2.bias"):
        load_official(head, partial)
    assert load_official(head, partial, strict=False) == ["fusion.vision_gate.fc2.bias"]


def test_load_official_into_an_ablated_head_names_the_keys_it_cannot_hold():
    _, params = _spm_head_and_params()
    head = CLIPSPMHead(64, heads=8, dim_head=16, mlp_dim=128, prompt_hidden=128, padm=False)
    with pytest.raises(CheckpointError, match="context1"):
        load_official(head, params)


def test_load_official_rejects_wrong_sizes():
    _, params = _spm_head_and_params()
    head = CLIPSPMHead(
        64, heads=8, dim_head=16, mlp_dim=256, prompt_hidden=128, motion_alpha_learnable=True
    )
    with pytest.raises(CheckpointError, match="net.0.weight"):
        load_official(head, params)


def test_fixed_motion_alpha_is_loaded_and_written_back_as_mo_alpha1():
    _, params = _spm_head_and_params()
    head = CLIPSPMHead(64, heads=8, dim_head=16, mlp_dim=128, prompt_hidden=128)  # fixed alpha
    load_official(head, params)
    assert not any(n == "motion_alpha" for n, _ in head.named_parameters())
    assert head.motion_alpha.item() == pytest.approx(params["mo_alpha1"].item())
    from fsar.heads import to_official

    assert float(to_official(head)["mo_alpha1"]) == pytest.approx(float(params["mo_alpha1"]))
