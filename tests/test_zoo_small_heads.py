"""TSN, CrossTransformer and STEN: release loop forms, unequal shots, official keys, contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsar.config import build_head_config
from fsar.errors import ConfigError
from fsar.heads import (
    BuildContext,
    CrossTransformerHead,
    EpisodeError,
    STENHead,
    TSNHead,
    build_head,
    cos_sim,
    episode_loss,
    load_official,
    to_official,
)
from fsar.torch_files import CheckpointError
from tests.test_heads_contract import QPC, WAY, D, close, make_episodes, run

NAMES = ("tsn", "crosstransformer", "sten")


def make(name: str, dtype=torch.float64, **options):
    """The registered head with its default options (hidden 1024 for the CrossTransformer)."""
    torch.manual_seed(0)
    config = build_head_config({"name": name, **options})
    return build_head(config, BuildContext(D)).to(dtype).eval()


def unequal_episode(seed=3):
    """One episode with 3/1/2/1 shots of the 4 classes, supports shuffled."""
    s, _, q, ct, ql = make_episodes(b=1, seed=seed)
    sl = torch.tensor([[0, 2, 1, 0, 3, 2, 0]])
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, 7, s.shape[2], D, generator=g, dtype=s.dtype) + ct[0, sl[0]][None, :, None]
    return s, sl, q, ct, ql


# ---------------------------------------------------------------- TSN


def test_tsn_is_the_mean_over_each_class_of_the_cosines_to_its_supports():
    s, sl, q, ct, _ = unequal_episode()
    logits = run(make("tsn"), s, sl, q, ct).logits[0]
    q_mean, s_mean = q[0].mean(1), s[0].mean(1)
    for i in range(q.shape[1]):
        for n in range(WAY):
            members = s_mean[sl[0] == n]
            sims = [
                (q_mean[i] @ v) / (q_mean[i].norm() * v.norm() + 0.01) for v in members
            ]  # the releases' cos_sim
            close(logits[i, n], torch.stack(sims).mean())


def test_tsn_averages_cosines_not_prototypes():
    s, sl, q, ct, _ = make_episodes(b=1)
    tsn = run(make("tsn"), s, sl, q, ct).logits
    proto = run(make("proto_mean"), s, sl, q, ct).logits
    assert (tsn - proto).abs().max() > 1e-3
    first = torch.stack([(sl[0] == n).nonzero()[0, 0] for n in range(WAY)])  # one shot: equal
    s1, sl1 = s[:, first], sl[:, first]
    close(run(make("tsn"), s1, sl1, q, ct).logits, run(make("proto_mean"), s1, sl1, q, ct).logits)


# ---------------------------------------------------------------- CrossTransformer


def crosstransformer_release_loop(head: CrossTransformerHead, s, sl, q, divisor=8.0):
    """One episode the release's way: classes in label order, each class's supports stacked,
    keys/values laid out [H, T*K] with index t*K + k, one softmax per (query frame, class)."""
    wk, wv = head.key_head.weight[..., 0], head.value_head.weight[..., 0]  # [H, D]
    hidden = wk.shape[0]
    logits = torch.zeros(q.shape[0], int(sl.max()) + 1, dtype=q.dtype)
    for n in range(logits.shape[1]):
        members = s[sl == n]  # [K, T, D]
        keys = torch.einsum("hd,ktd->htk", wk, members).reshape(hidden, -1)  # [H, T*K]
        values = torch.einsum("hd,ktd->htk", wv, members).reshape(hidden, -1)
        for i in range(q.shape[0]):
            query_key = q[i] @ wk.T  # [T, H]
            attention = torch.softmax(query_key @ keys * hidden**-0.5, -1)  # [T, T*K]
            prototype = attention @ values.T  # [T, H]
            query_value = q[i] @ wv.T
            cos = (F.normalize(prototype, dim=-1) * F.normalize(query_value, dim=-1)).sum()
            logits[i, n] = cos / divisor
    return logits


def test_crosstransformer_equals_the_release_loop_in_support_and_frame_order():
    head = make("crosstransformer", hidden=24)
    s, sl, q, ct, _ = make_episodes(b=1, seed=5)
    close(run(head, s, sl, q, ct).logits[0], crosstransformer_release_loop(head, s[0], sl[0], q[0]))


def test_crosstransformer_handles_unequal_shots_by_masking_each_class_softmax():
    head = make("crosstransformer", hidden=24)
    assert not head.require_equal_shots
    s, sl, q, ct, _ = unequal_episode()
    close(run(head, s, sl, q, ct).logits[0], crosstransformer_release_loop(head, s[0], sl[0], q[0]))


def test_crosstransformer_ignores_the_order_of_a_class_support_frames():
    # the release's t*K+k layout vs fsar's support-major one: a softmax over a set
    head = make("crosstransformer", hidden=24)
    s, sl, q, ct, _ = make_episodes(b=1, seed=6)
    shuffled = s[:, :, torch.randperm(s.shape[2])]  # same frames per support, other order
    out = run(head, s, sl, q, ct).logits
    close(run(head, shuffled, sl, q, ct).logits, out)


def test_crosstransformer_logit_divisor_only_scales_the_logits():
    s, sl, q, ct, _ = make_episodes(b=1)
    base = run(make("crosstransformer", hidden=16), s, sl, q, ct).logits
    close(
        run(make("crosstransformer", hidden=16, logit_divisor=2.0), s, sl, q, ct).logits, base * 4
    )
    t = s.shape[2]  # |logit| <= T / divisor
    assert base.abs().max() <= t / 8.0


def test_crosstransformer_official_keys_repeat_the_key_head_as_query_head():
    head = make("crosstransformer", hidden=16)
    official = to_official(head)
    assert set(official) == {"key_head.weight", "query_head.weight", "value_head.weight"}
    assert official["key_head.weight"].shape == (16, D, 1)
    assert torch.equal(official["query_head.weight"], official["key_head.weight"])
    fresh = make("crosstransformer", hidden=16)
    torch.nn.init.zeros_(fresh.key_head.weight)
    wrapped = {f"head.{k}": v for k, v in official.items()}  # the alibaba model_state layout
    load_official(fresh, wrapped)
    assert torch.equal(fresh.key_head.weight, head.key_head.weight)
    with pytest.raises(CheckpointError, match="missing"):
        load_official(fresh, {"query_head.weight": official["query_head.weight"]})


def test_crosstransformer_options_are_checked():
    with pytest.raises(ConfigError, match="head.hidden"):
        build_head_config({"name": "crosstransformer", "hidden": 0}).check()
    with pytest.raises(ConfigError, match="head.logit_divisor"):
        build_head_config({"name": "crosstransformer", "logit_divisor": 0.0}).check()


def test_crosstransformer_training_step_reaches_both_heads():
    head = make("crosstransformer", hidden=16).train()
    s, sl, q, ct, ql = make_episodes()
    episode_loss(head(s, sl, q, ct), ql).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


# ---------------------------------------------------------------- STEN


def test_sten_is_the_product_of_text_and_prototype_softmaxes_for_any_t():
    s, sl, q, ct, _ = unequal_episode()  # T = 5: the release would need 8
    logits = run(make("sten"), s, sl, q, ct).logits[0]
    q_mean = q[0].mean(1)
    prototypes = torch.stack([s[0, sl[0] == n].mean((0, 1)) for n in range(WAY)])
    for i in range(q.shape[1]):
        text = torch.softmax(cos_sim(q_mean[i : i + 1], ct[0])[0], -1)
        visual = torch.softmax(cos_sim(q_mean[i : i + 1], prototypes)[0], -1)
        close(logits[i], text * visual)
    assert ((logits > 0) & (logits < 1)).all() and (logits.sum(-1) <= 1).all()


def test_sten_release_loss_is_q_times_the_mean_cross_entropy():
    s, sl, q, ct, ql = make_episodes(b=1)
    out = run(make("sten"), s, sl, q, ct)
    summed = F.cross_entropy(out.logits[0], ql[0], reduction="sum")
    close(q.shape[1] * episode_loss(out, ql), summed)


def test_sten_depends_on_the_class_text():
    s, sl, q, ct, _ = make_episodes(b=1)
    head = make("sten")
    assert (
        run(head, s, sl, q, ct).logits - run(head, s, sl, q, ct.flip(1)).logits
    ).abs().max() > 1e-3


# ---------------------------------------------------------------- shared


@pytest.mark.parametrize("name", ["tsn", "sten"])
def test_parameter_free_heads_load_an_empty_or_backbone_only_state_dict(name):
    head = make(name)
    assert not list(head.parameters())
    assert load_official(head, {}) == []
    assert to_official(head) == {}
    load_official(head, {"backbone.conv1.weight": torch.zeros(1)})
    if name == "tsn":  # the alibaba framework's model_state: backbone under head.backbone.
        load_official(head, {"head.backbone.conv1.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="unknown"):
        load_official(head, {"scale": torch.ones(1)})


def test_the_specs_build_the_head_classes():
    assert isinstance(make("tsn"), TSNHead)
    assert isinstance(make("crosstransformer"), CrossTransformerHead)
    assert make("crosstransformer").key_head.weight.shape == (1024, D, 1)  # release hidden
    assert isinstance(make("sten"), STENHead)


@pytest.mark.parametrize("name", NAMES)
def test_contract_shapes_permutations_and_renaming(name):
    head = make(name)
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql)
    assert out.logits.shape == (2, WAY * QPC, WAY) and out.aux == {}
    ps, pq = torch.randperm(s.shape[1]), torch.randperm(q.shape[1])
    close(run(head, s[:, ps], sl[:, ps], q[:, pq], ct).logits, out.logits[:, pq])
    perm = torch.randperm(WAY)
    renamed = run(head, s, perm[sl], q, ct[:, torch.argsort(perm)])
    close(renamed.logits[..., perm], out.logits)
    close(run(head, s, sl, q, ct).logits, out.logits, 0)  # query labels change nothing


@pytest.mark.parametrize("name", NAMES)
def test_contract_batch_equals_single_episodes_and_float32_matches(name):
    head = make(name)
    s, sl, q, ct, _ = make_episodes(b=3, seed=4)
    out = run(head, s, sl, q, ct).logits
    singles = [
        run(head, s[i : i + 1], sl[i : i + 1], q[i : i + 1], ct[i : i + 1]) for i in range(3)
    ]
    close(out, torch.cat([o.logits for o in singles]))
    out32 = run(make(name, torch.float32), s.float(), sl, q.float(), ct.float()).logits
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_bad_shapes_raise_episode_errors(name):
    head = make(name)
    s, sl, q, ct, _ = make_episodes()
    with pytest.raises(EpisodeError, match="T="):
        run(head, s, sl, q[:, :, :-1], ct)
    with pytest.raises(EpisodeError, match="feature dims"):
        run(head, s, sl, q, ct[..., :-1])
