"""Every head of the zoo reproduces its release's outputs and gradients (../shared/golden/zoo).

Parametrised over the files of `$FSAR_ZOO_GOLDEN` (default ../shared/golden/zoo): a new golden
file of a known method is tested without code changes. Each file goes through the public path:
the head is built from the registry with the json's settings (`fsar.config.build_head_config`),
its weights come through `load_official`, and the method's adapter in tests/zoo_adapters/ only
names the release's inputs, loss formula and outputs.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fsar.config import build_head_config
from fsar.heads import BuildContext, build_head, load_official, official_key_map
from tests.zoo_golden_support import golden_episode, tensor

ZOO = Path(
    os.environ.get("FSAR_ZOO_GOLDEN", Path(__file__).resolve().parents[2] / "shared/golden/zoo")
)
FILES = sorted(p.stem for p in ZOO.glob("*.json"))
DTYPES = [torch.float32, torch.float64]

# golden file prefix (the json's "method") -> adapter module in tests/zoo_adapters/
ADAPTERS = {
    "otam": "otam",
    "tsn": "tsn",
    "trx": "trx",
    "trx1": "trx",
    "crosstransformer": "crosstransformer",
    "hyrsm1shot": "hyrsm",
    "hyrsm5shot": "hyrsm",
    "hyrsmpp1shot": "hyrsm",
    "hyrsmpp5shot": "hyrsm",
    "sten": "sten",
    "cpm2c": "cpm2c",
    "clipmei": "clipmei",
}

pytestmark = pytest.mark.skipif(not FILES, reason=f"no zoo golden files in {ZOO}")


def load(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    settings = json.loads((ZOO / f"{name}.json").read_text())
    with np.load(ZOO / f"{name}.npz") as z:
        return settings, {k: z[k] for k in z.files}


def adapter(settings: dict, name: str):
    method = settings.get("method", name.split("_")[0])
    assert method in ADAPTERS, f"{name}: no adapter for method {method!r} in tests/zoo_adapters"
    return importlib.import_module(f"tests.zoo_adapters.{ADAPTERS[method]}")


def build(settings: dict, arrays: dict, name: str, dtype: torch.dtype):
    """(head with the official weights loaded, adapter, episode) through the public path."""
    method = adapter(settings, name)
    episode = golden_episode(settings, arrays, dtype)
    config = build_head_config(method.head_options(settings))
    context = BuildContext(int(settings["D"]), {}, episode.num_classes)
    torch.manual_seed(1)  # a different init: everything must come from the official weights
    head = build_head(config, context).to(dtype).eval()
    params = {k[6:]: tensor(v, dtype) for k, v in arrays.items() if k.startswith("param.")}
    load_official(head, params)
    return head, method, episode


def assert_close(actual: torch.Tensor, expected: np.ndarray, rel: float, what: str) -> None:
    expected_t = torch.from_numpy(np.asarray(expected)).to(actual.dtype)
    assert actual.shape == expected_t.shape, (
        f"{what}: shape {list(actual.shape)} vs {list(expected_t.shape)}"
    )
    scale = max(float(np.abs(expected).max()), 1e-6)
    torch.testing.assert_close(
        actual.detach(), expected_t, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", FILES)
def test_zoo_head_matches_the_release(name, dtype):
    settings, arrays = load(name)
    head, method, episode = build(settings, arrays, name, dtype)
    outputs = method.release_outputs(head, episode)
    assert "output.loss" in outputs and "output.logits" in outputs
    expected_outputs = [k for k in arrays if k.startswith("output.")]
    for key in expected_outputs:
        if key in outputs:
            assert_close(outputs[key], arrays[key], 1e-5, key)
    compared = [k for k in expected_outputs if k in outputs]
    assert set(method.REQUIRED_OUTPUTS) <= set(compared), f"outputs not compared: {compared}"

    outputs["output.loss"].backward()
    key_map = official_key_map(head)
    params = dict(head.named_parameters())
    for key, expected in arrays.items():
        if key.startswith("grad_input."):
            leaf = episode.inputs()[key[len("grad_input.") :]]
            assert leaf.grad is not None, f"{key}: the loss does not reach this input"
            assert_close(leaf.grad, expected, 1e-4, key)
        elif key.startswith("grad."):
            official = key[len("grad.") :]
            grad = params[key_map[official]].grad
            if np.abs(expected).max() < 1e-7:  # analytically zero, stored as float noise
                assert grad is None or float(grad.abs().max()) < 1e-6, key
                continue
            assert grad is not None, f"{key}: the head's parameter gets no gradient"
            assert_close(grad, expected, 1e-4, key)


@pytest.mark.parametrize("name", FILES)
def test_zoo_official_keys_round_trip(name):
    from fsar.heads import to_official

    settings, arrays = load(name)
    head, method, _ = build(settings, arrays, name, torch.float32)
    params = {k[6:]: tensor(v, torch.float32) for k, v in arrays.items() if k.startswith("param.")}
    back = to_official(head)
    for key, value in params.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)
    # a release module registered under two names is saved under both (not stored twice here)
    aliases = getattr(method, "OFFICIAL_ALIASES", {})
    for alias, key in aliases.items():
        torch.testing.assert_close(back[alias], params[key], rtol=0, atol=0, msg=alias)
    unused = set(settings.get("unused_params", {})) | set(aliases)
    assert set(back) - set(params) <= unused | _non_trainable(back), sorted(set(back) - set(params))


def _non_trainable(state: dict[str, torch.Tensor]) -> set[str]:
    """Official entries that are not trained floats (e.g. TRX's index tuples)."""
    return {k for k, v in state.items() if not v.is_floating_point()}
