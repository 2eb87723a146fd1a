"""TRX head: tuples, position code, vectorised form == a per-class loop, unequal shots, dropout,
official keys, and that every per-cardinality output of the golden files is compared."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fsar.config import build_head_config
from fsar.errors import ConfigError
from fsar.heads import EpisodeError, TRXHead, load_official, to_official
from fsar.heads.trx import frame_tuples, position_code
from fsar.torch_files import CheckpointError
from tests.test_zoo_golden import FILES, build, load

D, E = 6, 10
TRX_FILES = [name for name in FILES if name.split("_")[0] in ("trx", "trx1")]


def make_head(temporal_set=(2, 3), dim=D, **kwargs) -> TRXHead:
    torch.manual_seed(0)
    head = TRXHead(dim, temporal_set, out_dim=E, **kwargs).double().eval()
    with torch.no_grad():  # move LayerNorm away from its identity init
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head


def episode(shots=(2, 1, 3), queries=4, t=5, b=1, seed=0):
    """Shuffled supports with the given shot per class: support, labels, query, class_text."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([c for c, k in enumerate(shots) for _ in range(k)])
    labels = torch.stack([labels[torch.randperm(len(labels), generator=g)] for _ in range(b)])
    centres = torch.randn(b, len(shots), 1, D, generator=g, dtype=torch.float64)
    support = torch.gather(
        centres.expand(-1, -1, t, -1), 1, labels[..., None, None].expand(-1, -1, t, D)
    ) + 0.7 * torch.randn(b, labels.shape[1], t, D, generator=g, dtype=torch.float64)
    query = torch.randn(b, queries, t, D, generator=g, dtype=torch.float64)
    class_text = torch.zeros(b, len(shots), D, dtype=torch.float64)
    return support, labels, query, class_text


def loop_logits(head: TRXHead, support, labels, query) -> torch.Tensor:
    """The method written per query and class for one episode: [S,T,D], [S], [Q,T,D] -> [Q,N]."""
    t = support.shape[1]
    pe = torch.zeros(t, D, dtype=support.dtype)
    for p in range(t):
        for i in range(0, D, 2):
            angle = p / 10000 ** (i / D)
            pe[p, i] = 0.1 * math.sin(angle)
            if i + 1 < D:
                pe[p, i + 1] = 0.1 * math.cos(angle)
    n_way = int(labels.max()) + 1
    per_k = []
    for k, tr in zip(head.temporal_set, head.transformers, strict=True):
        combos = list(itertools.combinations(range(t), k))

        def tuples(x, combos):  # [V, T, D] -> [V, L, k*D]: each tuple's frames concatenated
            return torch.stack([torch.cat([x[:, i] for i in c], -1) for c in combos], 1)

        s, q = tuples(support + pe, combos), tuples(query + pe, combos)
        s_k, s_v = tr.norm_k(tr.k_linear(s)), tr.v_linear(s)
        q_k, q_v = tr.norm_k(tr.k_linear(q)), tr.v_linear(q)
        rows = []
        for i in range(query.shape[0]):
            row = []
            for c in range(n_way):
                keys = s_k[labels == c].reshape(-1, E)  # all (support, tuple) pairs of class c
                values = s_v[labels == c].reshape(-1, E)
                attention = torch.softmax(q_k[i] @ keys.T / math.sqrt(E), dim=-1)
                prototype = attention @ values  # [L, E]
                row.append(-((q_v[i] - prototype) ** 2).sum() / len(combos))
            rows.append(torch.stack(row))
        per_k.append(torch.stack(rows))
    return torch.stack(per_k).mean(0)


def test_tuples_are_the_lexicographic_combinations_of_frame_indices():
    for t, k in [(8, 1), (8, 2), (8, 3), (7, 3), (4, 4)]:
        expected = torch.tensor(list(itertools.combinations(range(t), k)))
        assert torch.equal(frame_tuples(t, k), expected)
    assert frame_tuples(8, 2).shape == (28, 2) and frame_tuples(8, 3).shape == (56, 3)


def test_position_code_is_the_scaled_sinusoid_also_for_an_odd_width():
    code = position_code(12, 5, 0.1, torch.float64)
    p = torch.arange(12, dtype=torch.float64)
    for i in range(5):
        angle = p / 10000 ** ((i - i % 2) / 5)
        expected = 0.1 * (torch.sin(angle) if i % 2 == 0 else torch.cos(angle))
        torch.testing.assert_close(code[:, i], expected)


@pytest.mark.parametrize("shots", [(2, 1, 3), (2, 2, 2), (1, 1, 1, 1)])
def test_vectorised_head_equals_the_per_class_loop(shots):
    head = make_head()
    support, labels, query, class_text = episode(shots)
    out = head(support, labels, query, class_text).logits[0]
    torch.testing.assert_close(out, loop_logits(head, support[0], labels[0], query[0]))


def test_unequal_shots_give_the_loop_gradients():
    """Padded class slots are masked out of the softmax: no leak into values or gradients."""
    head = make_head(temporal_set=(1, 3))
    support, labels, query, class_text = episode((3, 1, 2), t=4)
    grads = []
    for fn in (
        lambda s, q: head(s[None], labels, q[None], class_text).logits[0],
        lambda s, q: loop_logits(head, s, labels[0], q),
    ):
        s, q = support[0].clone().requires_grad_(), query[0].clone().requires_grad_()
        head.zero_grad()
        (fn(s, q) * torch.linspace(-1, 1, 3, dtype=s.dtype)).sum().backward()
        grads.append([s.grad, q.grad, *[p.grad.clone() for p in head.parameters()]])
    for ours, loop in zip(*grads, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, loop)


def test_batched_episodes_equal_single_calls_with_different_shot_patterns():
    head = make_head()
    first, second = episode((2, 1, 3), seed=1), episode((3, 2, 1), seed=2)
    batched = [torch.cat([a, b]) for a, b in zip(first, second, strict=True)]
    out = head(*batched).logits
    torch.testing.assert_close(out[0], head(*first).logits[0])
    torch.testing.assert_close(out[1], head(*second).logits[0])


def test_logits_are_the_mean_of_the_cardinality_logits_and_ignore_support_order():
    from fsar.heads import Episode

    head = make_head(temporal_set=(1, 2, 3))
    support, labels, query, class_text = episode()
    per = head.cardinality_logits(Episode.checked(support, labels, query, class_text))
    assert list(per) == [1, 2, 3]
    logits = head(support, labels, query, class_text).logits
    torch.testing.assert_close(logits, torch.stack(list(per.values())).mean(0))
    perm = torch.randperm(labels.shape[1])
    torch.testing.assert_close(
        head(support[:, perm], labels[:, perm], query, class_text).logits, logits
    )


def test_v_linear_bias_cancels():
    head = make_head()
    support, labels, query, class_text = episode()
    before = head(support, labels, query, class_text).logits
    with torch.no_grad():
        for tr in head.transformers:
            tr.v_linear.bias.add_(5.0)
    torch.testing.assert_close(head(support, labels, query, class_text).logits, before)


def test_dropout_acts_in_training_only():
    head = make_head(dropout=0.5)
    support, labels, query, class_text = episode()
    evaluated = head(support, labels, query, class_text).logits
    torch.testing.assert_close(head(support, labels, query, class_text).logits, evaluated)
    head.train()
    torch.manual_seed(3)
    first = head(support, labels, query, class_text).logits
    second = head(support, labels, query, class_text).logits
    assert not torch.allclose(first, evaluated) and not torch.allclose(first, second)
    no_dropout = make_head(dropout=0.0).train()
    torch.testing.assert_close(no_dropout(support, labels, query, class_text).logits, evaluated)


def test_bad_frame_counts_and_widths_raise():
    support, labels, query, class_text = episode(t=2)
    with pytest.raises(EpisodeError, match="T >= 3"):
        make_head()(support, labels, query, class_text)
    support, labels, query, class_text = episode(t=5)
    with pytest.raises(EpisodeError, match="max_len=4"):
        make_head(max_len=4)(support, labels, query, class_text)
    with pytest.raises(EpisodeError, match="D=8"):
        make_head(dim=8)(support, labels, query, class_text)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temporal_set": []}, "temporal_set"),
        ({"temporal_set": [2, 2]}, "temporal_set"),
        ({"temporal_set": [0, 1]}, "temporal_set"),
        ({"out_dim": 0}, "out_dim"),
        ({"max_len": 2}, "max_len"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_check_names_the_bad_option(options, message):
    config = build_head_config({"name": "trx", **options})
    with pytest.raises(ConfigError, match=f"head.{message}"):
        config.check()


def test_release_state_dict_loads_and_to_official_plus_tables_gives_its_keys():
    head = make_head()
    tables = head.release_tables(8)
    assert [k for k in tables if k.startswith("transformers.1.tuples.")][-1].endswith(".55")
    assert torch.equal(tables["transformers.0.tuples.27"], torch.tensor([6, 7]))
    assert tables["transformers.0.pe.pe"].shape == (1, 12, D)
    release = {**to_official(head), **tables}
    expected = {
        f"transformers.{i}.{part}.{kind}"
        for i in range(2)
        for part in ("k_linear", "v_linear", "norm_k", "norm_v")
        for kind in ("weight", "bias")
    }
    expected |= {f"transformers.0.tuples.{j}" for j in range(28)}
    expected |= {f"transformers.1.tuples.{j}" for j in range(56)}
    expected |= {"transformers.0.pe.pe", "transformers.1.pe.pe"}
    assert set(release) == expected
    fresh = TRXHead(D, (2, 3), out_dim=E).double()
    wrapped = {f"head.{k}": v for k, v in release.items()} | {"head.backbone.w": torch.ones(1)}
    assert load_official(fresh, wrapped) == []
    for key, value in to_official(head).items():
        torch.testing.assert_close(to_official(fresh)[key], value)
    with pytest.raises(CheckpointError, match="transformers.0.extra"):
        load_official(fresh, {**release, "transformers.0.extra": torch.ones(1)})


@pytest.mark.parametrize("name", TRX_FILES)
def test_every_per_cardinality_output_of_a_golden_file_is_returned(name):
    settings, arrays = load(name)
    head, method, episode_ = build(settings, arrays, name, torch.float64)
    outputs = method.release_outputs(head, episode_)
    expected = {k for k in arrays if k.startswith("output.")}
    assert {f"output.logits_card{k}" for k in settings["temp_set"]} <= expected
    assert expected <= set(outputs), sorted(expected - set(outputs))


def test_renaming_classes_permutes_columns_and_permuting_queries_permutes_rows():
    head = make_head()
    support, labels, query, class_text = episode((2, 1, 3))
    logits = head(support, labels, query, class_text).logits
    rename = torch.tensor([2, 0, 1])  # old label -> new label
    renamed = head(support, rename[labels], query, class_text[:, torch.argsort(rename)]).logits
    torch.testing.assert_close(renamed[..., rename], logits)
    perm = torch.randperm(query.shape[1])
    torch.testing.assert_close(
        head(support, labels, query[:, perm], class_text).logits, logits[:, perm]
    )


def test_float32_matches_float64_with_the_registry_defaults():
    from fsar.heads import BuildContext, build_head

    torch.manual_seed(0)
    head = build_head(build_head_config({"name": "trx"}), BuildContext(32)).double().eval()
    g = torch.Generator().manual_seed(0)
    support = torch.randn(1, 6, 5, 32, generator=g, dtype=torch.float64)
    query = torch.randn(1, 4, 5, 32, generator=g, dtype=torch.float64)
    inputs = (support, torch.tensor([[0, 1, 2, 0, 1, 0]]), query, torch.zeros(1, 3, 32))
    double = head(*inputs).logits
    single = head.float()(inputs[0].float(), inputs[1], inputs[2].float(), inputs[3]).logits
    assert double.shape == (1, 4, 3) and head.transformers[0].k_linear.out_features == 1152
    torch.testing.assert_close(single.double(), double, rtol=1e-4, atol=1e-4)
