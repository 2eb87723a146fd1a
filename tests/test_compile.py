"""train.compile (issue 14): the head step under torch.compile, without graph breaks, as eager.

Graph capture uses dynamo's `explain` (tracing only); the compiled runs use the "aot_eager"
backend, which captures the same graphs and their backward as inductor but generates no C++, so
these tests need no compiler and run in seconds. One test compiles with inductor where a C++
compiler is present.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import fsar.pipelines.compiled as compiled
from fsar.config import load_config
from fsar.data.synthetic import DemoSpec, render_demo_dataset
from fsar.heads import HEADS, BuildContext, EpisodeError, build_head, episode_loss
from fsar.heads.registry import head_config
from fsar.pipelines.build import aux_weights
from fsar.pipelines.compiled import CompiledHead
from fsar.pipelines.train import train_heads

from .test_heads_contract import NUM_CLASSES, D, make_episodes, training_inputs
from .test_pipelines import SMALL_HEAD, extract_store


class CountingBackend:
    """aot_eager that counts the graphs it is asked to compile."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches compiled code per function across head instances: start each test clean."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_head(name: str, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = HEADS[name]
    return build_head(head_config(name, **spec.tiny), BuildContext(D, {}, NUM_CLASSES)).to(dtype)


def episode_inputs(name: str, training: bool, dtype=torch.float32):
    s, sl, q, ct, ql = make_episodes(dtype=dtype)
    extras = training_inputs(name, sl, ql) if training else {}
    extras = {k: v.to(dtype) if v.is_floating_point() else v for k, v in extras.items()}
    return (s, sl, q, ct), (ql if training else None), extras


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_computes_in_one_graph_without_breaks(name, training):
    head = tiny_head(name).train(training)
    args, query_labels, extras = episode_inputs(name, training)
    episode = head.episode(*args, query_labels, **extras)
    with torch.set_grad_enabled(training):
        report = torch._dynamo.explain(head.compute)(episode, **extras)
    reasons = [str(b.reason).splitlines()[0] for b in report.break_reasons]
    assert report.graph_break_count == 0, f"{name}: {reasons}"
    assert report.graph_count == 1


def test_the_otam_sweep_operators_pass_the_custom_op_checks():
    # schema, fake (meta) kernels, autograd registration, AOT dispatch
    for shape in [(3, 4, 5), (2, 2, 3, 6, 6), (1, 1, 1)]:
        dists = torch.rand(*shape, dtype=torch.float64, requires_grad=True)
        torch.library.opcheck(torch.ops.fsar.otam_sweep.default, (dists, 0.5))
        cost, neg_cost, skew = torch.ops.fsar.otam_sweep(dists.detach(), 0.5)
        grad = torch.rand(cost.shape, dtype=torch.float64)
        torch.library.opcheck(torch.ops.fsar.otam_sweep_backward.default, (grad, neg_cost, skew))


def steps_of(model, head, name, args, query_labels, extras, steps: int = 3):
    """Loss and gradients of a few Adam steps with dropout on, from the same random state."""
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
    torch.manual_seed(1)
    losses, grads = [], []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        output = model(*args, query_labels=query_labels, **extras)
        weights = aux_weights(head_config(name), set(output.aux))
        loss = episode_loss(output, query_labels, weights)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in head.parameters() if p.grad is not None])
        optimizer.step()
    return torch.stack(losses), grads


@pytest.mark.parametrize("name", list(HEADS))
def test_compiled_steps_equal_the_eager_ones(name):
    """Three Adam steps (dropout on); a head without parameters: its scores."""
    args, query_labels, extras = episode_inputs(name, training=True)
    runs, backend = [], CountingBackend()
    for compile_ in (False, True):
        head = tiny_head(name).train()
        model = CompiledHead(head, backend) if compile_ else head
        if any(True for _ in head.parameters()):
            runs.append(steps_of(model, head, name, args, query_labels, extras))
        else:
            with torch.no_grad():
                runs.append((model(*args, query_labels=query_labels).logits, []))
    (eager_out, eager_grads), (compiled_out, compiled_grads) = runs
    assert backend.graphs == 1  # one graph, compiled once for the three steps
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-7)
    for eager, compiled_ in zip(eager_grads, compiled_grads, strict=True):
        for a, b in zip(eager, compiled_, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_other_shapes_run_eagerly_and_value_checks_still_raise():
    head = tiny_head("clipspm").eval()
    backend = CountingBackend()
    model = CompiledHead(head, backend)
    s, sl, q, ct, _ = make_episodes(b=3, dtype=torch.float32)
    with torch.no_grad():
        full = model(s, sl, q, ct).logits
        last = model(s[:1], sl[:1], q[:1], ct[:1]).logits  # a smaller last batch: no recompile
        eager = head(s, sl, q, ct).logits
    assert backend.graphs == 1
    torch.testing.assert_close(full, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last, eager[:1], rtol=1e-6, atol=1e-6)
    with pytest.raises(EpisodeError, match="support_labels must lie in"):
        model(s, sl + 7, q, ct)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="inductor needs a C++ compiler on CPU")
def test_inductor_compiles_the_otam_head_and_its_custom_operator():
    head = tiny_head("otam").eval()
    model = CompiledHead(head, "inductor")
    args, _, _ = episode_inputs("otam", training=False)
    with torch.no_grad():
        torch.testing.assert_close(model(*args).logits, head(*args).logits)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("compile")
    spec = DemoSpec(videos_per_class=6, n_frames=12, frames_jitter=2, size=48)
    render_demo_dataset(base / "videos", spec)
    return extract_store(base / "videos", base / "store.zarr", "fsar-tiny-vit")


def test_train_compile_gives_the_eager_loss_curve_and_compiles_twice(store, tmp_path, monkeypatch):
    backend = CountingBackend()
    monkeypatch.setattr(compiled, "BACKEND", backend)
    curves = {}
    for flag in ("false", "true"):
        out = tmp_path / f"compile_{flag}"
        settings = [f"train.store={store}", f"train.out={out}", "train.steps=4"]
        settings += ["train.val_every=2", "head.name=clipspm", "train.device=cpu"]
        settings += [*SMALL_HEAD, f"train.compile={flag}"]  # 40 val episodes, batches of 30
        train_heads(load_config([], settings), progress=False)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        curves[flag] = {
            kind: [x["loss" if kind == "train" else "accuracy"] for x in lines if x["kind"] == kind]
            for kind in ("train", "val")
        }
    # training (4 steps x 2 micro-batches) and validation (40 episodes: a batch of 30 compiled,
    # the last 10 eagerly) each compile one graph, once
    assert backend.graphs == 2
    assert len(curves["true"]["train"]) == 4
    torch.testing.assert_close(
        torch.tensor(curves["true"]["train"]), torch.tensor(curves["false"]["train"]), rtol=1e-5,
        atol=1e-6,
    )  # fmt: skip
    assert curves["true"]["val"] == curves["false"]["val"]
