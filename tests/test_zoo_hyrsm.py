"""HyRSM / HyRSM++ heads: contract, the vectorised form against a per-query loop, the release's
position code and regulariser, the training terms, config and official keys.

Numbers against the release itself are in tests/test_zoo_golden.py (-k hyrsm).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fsar.config import build_head_config
from fsar.errors import ConfigError
from fsar.heads import (
    BuildContext,
    EpisodeError,
    HyRSMHead,
    HyRSMPlusPlusHead,
    build_head,
    episode_loss,
    head_spec,
    load_official,
    to_official,
)
from fsar.heads.hyrsm_parts import position_code, temporal_regular_loss
from tests.test_heads_contract import QPC, SHOT, WAY, D, close, make_episodes, run

C = 10  # training classes of the frame classifier
FORMS = ["videos", "prototypes", "auto"]
HEADS = [("hyrsm", form) for form in FORMS] + [("hyrsm_pp", form) for form in FORMS]


def make(name: str, set_members: str = "auto", dtype=torch.float64, **options) -> HyRSMHead:
    torch.manual_seed(0)
    config = build_head_config({"name": name, "set_members": set_members, **options})
    config.check()
    return build_head(config, BuildContext(D, {}, C)).to(dtype).eval()


def class_ids(sl, ql):
    """Training-class ids consistent with the episode labels (label n -> class n + 3)."""
    return dict(support_class_ids=sl + 3, query_class_ids=ql + 3)


# ---- contract ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,form", HEADS)
def test_permuting_supports_and_queries_and_renaming_classes(name, form):
    head = make(name, form)
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql)
    assert out.logits.shape == (2, WAY * QPC, WAY) and torch.isfinite(out.logits).all()
    ps, pq = torch.randperm(s.shape[1]), torch.randperm(q.shape[1])
    permuted = run(head, s[:, ps], sl[:, ps], q[:, pq], ct, ql[:, pq])
    close(permuted.logits, out.logits[:, pq])
    for key in out.aux:
        close(permuted.aux[key], out.aux[key])
    perm = torch.randperm(WAY)
    renamed = run(head, s, perm[sl], q, ct[:, torch.argsort(perm)], perm[ql])
    close(renamed.logits[..., perm], out.logits)


@pytest.mark.parametrize("name,form", HEADS)
def test_logits_never_depend_on_query_labels_or_query_class_ids(name, form):
    head = make(name, form)
    s, sl, q, ct, ql = make_episodes()
    without = run(head, s, sl, q, ct).logits
    with torch.no_grad():
        other = head(s, sl, q, ct, torch.roll(ql, 1, 1), **class_ids(sl, torch.roll(ql, 1, 1)))
    close(run(head, s, sl, q, ct, ql).logits, without, 0)
    close(other.logits, without, 0)


@pytest.mark.parametrize("name,form", HEADS)
def test_a_batch_of_episodes_gives_the_per_episode_results(name, form):
    head = make(name, form)
    s, sl, q, ct, ql = make_episodes(b=3, seed=4)
    ids = class_ids(sl, ql)
    with torch.no_grad():
        out = head(s, sl, q, ct, ql, **ids)
        singles = [
            head(s[i : i + 1], sl[i : i + 1], q[i : i + 1], ct[i : i + 1], ql[i : i + 1],
                 **{k: v[i : i + 1] for k, v in ids.items()})
            for i in range(3)
        ]  # fmt: skip
    close(out.logits, torch.cat([o.logits for o in singles]))
    assert set(out.aux) == {"frame_class"} | ({"temporal_regular"} if name == "hyrsm_pp" else set())
    for key in out.aux:
        close(out.aux[key], torch.stack([o.aux[key] for o in singles]).mean())


@pytest.mark.parametrize("name", ["hyrsm", "hyrsm_pp"])
def test_float32_matches_float64(name):
    s, sl, q, ct, ql = make_episodes()
    out64 = run(make(name), s, sl, q, ct, ql)
    out32 = run(make(name, dtype=torch.float32), s.float(), sl, q.float(), ct.float(), ql)
    torch.testing.assert_close(out32.logits.double(), out64.logits, rtol=1e-4, atol=1e-4)


# ---- the maths --------------------------------------------------------------------------------


def loop_logits(head: HyRSMHead, s, sl, q, videos: bool) -> torch.Tensor:
    """One episode [S,T,D] / [Q,T,D], query by query, as the release writes it (concatenation +
    1x1 Conv1d, explicit min-sum distances, class means by masks)."""
    n_way = int(sl.max()) + 1
    s1, q1 = head.encode_frames(s), head.encode_frames(q)
    members = s1 if videos else torch.stack([s1[sl == c].mean(0) for c in range(n_way)])
    t = s.shape[1]
    rows = []
    for i in range(q.shape[0]):
        tokens = torch.cat([members.mean(1), q1[i].mean(0, keepdim=True)])[None]  # [1, M+1, D]
        z = F.relu(head.temporal_atte(tokens))[0]
        videos_in = torch.cat(
            [torch.cat([members, q1[i : i + 1]]), z[:, None].expand(-1, t, -1)], -1
        )
        adapted = F.conv1d(videos_in.transpose(1, 2), head.layer2[0].weight, head.layer2[0].bias)
        adapted = adapted.transpose(1, 2)  # [M+1, T, D]
        dists = []
        for m in range(members.shape[0]):
            d = 1 - F.cosine_similarity(adapted[m][:, None], adapted[-1][None], dim=-1, eps=1e-12)
            dists.append(d.min(1).values.sum() + d.min(0).values.sum())
        dists = torch.stack(dists)
        if videos:
            dists = torch.stack([dists[sl == c].mean() for c in range(n_way)])
        rows.append(-dists)
    return torch.stack(rows)


@pytest.mark.parametrize("form", ["videos", "prototypes"])
def test_the_vectorised_head_equals_the_per_query_loop(form):
    head = make("hyrsm", form)
    s, sl, q, ct, _ = make_episodes(b=2, shot=3)
    out = run(head, s, sl, q, ct).logits
    with torch.no_grad():
        for b in range(2):
            close(out[b], loop_logits(head, s[b], sl[b], q[b], form == "videos"), 1e-10)


def test_with_one_shot_every_set_member_form_gives_the_same_logits():
    s, sl, q, ct, _ = make_episodes(shot=1)
    videos = run(make("hyrsm", "videos"), s, sl, q, ct).logits
    close(run(make("hyrsm", "prototypes"), s, sl, q, ct).logits, videos)
    close(run(make("hyrsm", "auto"), s, sl, q, ct).logits, videos)


def test_auto_takes_prototypes_with_more_shots_and_the_forms_then_differ():
    s, sl, q, ct, _ = make_episodes(shot=SHOT)
    auto = run(make("hyrsm", "auto"), s, sl, q, ct).logits
    close(auto, run(make("hyrsm", "prototypes"), s, sl, q, ct).logits, 0)
    assert (auto - run(make("hyrsm", "videos"), s, sl, q, ct).logits).abs().max() > 1e-6


def test_unequal_shots_work_in_both_forms():
    s, sl, q, ct, _ = make_episodes()
    sl = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 3]] * 2)
    for form in ("videos", "prototypes"):
        assert torch.isfinite(run(make("hyrsm", form), s, sl, q, ct).logits).all()


def test_position_code_is_the_release_table():
    t, d = 9, 12
    expected = torch.zeros(t, d, dtype=torch.float64)
    for pos in range(t):
        for i in range(0, d, 2):
            expected[pos, i] = math.sin(pos / (10000 ** ((2 * i) / d)))
            expected[pos, i + 1] = math.cos(pos / (10000 ** ((2 * (i + 1)) / d)))
    close(position_code(t, d), expected, 1e-12)


def test_frames_are_rescaled_by_sqrt_d_over_a_before_the_position_code():
    head = make("hyrsm", position_a=4.0, position_b=0.5)
    x = torch.randn(2, 3, 5, D, dtype=torch.float64)
    coded = x * math.sqrt(D / 4.0) + 0.5 * position_code(5, D)
    close(head.encode_frames(x), F.relu(head.temporal_atte_before(coded.flatten(0, 1))).view_as(x))


def test_temporal_regular_loss_is_the_release_formula():
    t, window, balance, beta = 6, 1, 51.0, 10.0
    w = torch.zeros(t, t, dtype=torch.float64)
    m = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(t):
            if abs(i - j) <= window:
                w[i, j], m[i, j] = 1.0 / ((i - j) ** 2 + 1.0), 1.0
            else:
                w[i, j] = 1.0 - math.exp(-((abs(i - j) - window) ** 2) / balance)
    frames = torch.randn(2, 3, 4, t, D, dtype=torch.float64)
    for b in range(2):
        x = F.normalize(frames[b].reshape(-1, t, D), dim=-1)
        f = 1 - x @ x.transpose(1, 2)
        expected = (f * m * w + beta * (1 - m) * F.relu(w - f)).mean()
        close(temporal_regular_loss(frames, window, balance, beta)[b], expected, 1e-12)


# ---- training terms ---------------------------------------------------------------------------


def test_frame_class_term_is_the_mean_frame_cross_entropy():
    head = make("hyrsm")
    s, sl, q, ct, ql = make_episodes()
    ids = class_ids(sl, ql)
    with torch.no_grad():
        out = head(s, sl, q, ct, **ids)
        frames = torch.cat([head.encode_frames(s), head.encode_frames(q)], 1)
        targets = torch.cat([ids["support_class_ids"], ids["query_class_ids"]], 1)
        logits = head.frame_class_logits(frames)  # [B, S+Q, T, C]
    assert logits.shape[-1] == C
    expected = F.cross_entropy(logits.permute(0, 3, 1, 2), targets[..., None].expand(-1, -1, 5))
    close(out.aux["frame_class"], expected)
    assert "frame_class" not in run(head, s, sl, q, ct, ql).aux


def test_temporal_regular_only_in_hyrsm_pp_and_only_with_query_labels():
    s, sl, q, ct, ql = make_episodes()
    plain, plus = make("hyrsm"), make("hyrsm_pp")
    plus.load_state_dict(plain.state_dict())
    assert "temporal_regular" not in run(plain, s, sl, q, ct, ql).aux
    assert "temporal_regular" not in run(plus, s, sl, q, ct).aux
    out = run(plus, s, sl, q, ct, ql)
    assert out.aux["temporal_regular"] > 0
    close(out.logits, run(plain, s, sl, q, ct).logits, 0)  # a regulariser: same logits


def test_bad_class_ids_raise_one_clear_error():
    head = make("hyrsm")
    s, sl, q, ct, ql = make_episodes()
    with pytest.raises(EpisodeError, match="support_class_ids and query_class_ids"):
        head(s, sl, q, ct, support_class_ids=sl)
    with pytest.raises(EpisodeError, match=r"0\.\.9"):
        head(s, sl, q, ct, support_class_ids=sl + 7, query_class_ids=ql)
    with pytest.raises(EpisodeError, match=r"class ids must be \[B,S\]"):
        head(s, sl, q, ct, support_class_ids=sl[:, :3], query_class_ids=ql)
    with pytest.raises(EpisodeError, match="text_table has 4 rows"):
        head(s, sl, q, ct, **class_ids(sl, ql), text_table=torch.zeros(4, D))


@pytest.mark.parametrize("name", ["hyrsm", "hyrsm_pp"])
def test_a_training_step_with_the_default_weights_reaches_every_parameter(name):
    head = make(name).train()
    s, sl, q, ct, ql = make_episodes()
    torch.manual_seed(3)
    out = head(s, sl, q, ct, ql, **class_ids(sl, ql), text_table=torch.zeros(C, D))
    episode_loss(out, ql, head_spec(name).aux_weights).backward()
    missing = [
        n for n, p in head.named_parameters() if p.grad is None or not p.grad.isfinite().all()
    ]
    assert not missing


def test_dropout_is_on_in_training_only_and_can_be_switched_off():
    s, sl, q, ct, _ = make_episodes()
    eval_logits = run(make("hyrsm"), s, sl, q, ct).logits
    assert (run(make("hyrsm").train(), s, sl, q, ct).logits - eval_logits).abs().max() > 1e-6
    close(run(make("hyrsm", dropout=False).train(), s, sl, q, ct).logits, eval_logits)


# ---- config, build, official keys -------------------------------------------------------------


def test_mid_dim_sets_the_attention_width():
    head = make("hyrsm", mid_dim=16, heads=4)
    assert head.temporal_atte_before.fn.to_qkv.weight.shape == (48, D)
    assert head.temporal_atte.w_qs.weight.shape == (16, D)
    assert head.layer2[0].weight.shape == (D, 2 * D, 1)
    s, sl, q, ct, _ = make_episodes()
    assert torch.isfinite(run(head, s, sl, q, ct).logits).all()


def test_config_and_build_errors_name_the_key():
    with pytest.raises(ConfigError, match="set_members"):
        build_head_config({"name": "hyrsm", "set_members": "classes"})
    with pytest.raises(ConfigError, match="window_size is an option of hyrsm_pp"):
        build_head_config({"name": "hyrsm", "window_size": 2})
    with pytest.raises(ConfigError, match="head.mid_dim"):
        build_head_config({"name": "hyrsm", "mid_dim": 20}).check()
    with pytest.raises(ConfigError, match="head.temporal_balance"):
        build_head_config({"name": "hyrsm_pp", "temporal_balance": 0}).check()
    with pytest.raises(ConfigError, match="num_train_classes"):
        build_head(build_head_config({"name": "hyrsm"}), BuildContext(D))
    with pytest.raises(ConfigError, match="head.heads=5 must divide the feature dim"):
        build_head(build_head_config({"name": "hyrsm", "heads": 5}), BuildContext(D, {}, C))


def test_defaults_are_the_release_values():
    config = build_head_config({"name": "hyrsm_pp"})
    assert (config.set_members, config.mid_dim, config.heads) == ("auto", None, 8)
    assert (config.position_a, config.position_b, config.dropout) == (10.0, 1.0, True)
    assert (config.window_size, config.temporal_balance, config.balance_coefficient) == (1, 51, 10)
    assert dict(head_spec("hyrsm").aux_weights) == {"frame_class": 0.6}
    assert dict(head_spec("hyrsm_pp").aux_weights) == {"frame_class": 0.6, "temporal_regular": 0.3}
    assert head_spec("hyrsm_pp").training_inputs(config).class_ids
    assert isinstance(make("hyrsm_pp"), HyRSMPlusPlusHead)


RELEASE_KEYS = {
    "temporal_atte_before.norm.weight": (D,),
    "temporal_atte_before.norm.bias": (D,),
    "temporal_atte_before.fn.to_qkv.weight": (3 * D, D),
    "temporal_atte_before.fn.to_out.0.weight": (D, D),
    "temporal_atte_before.fn.to_out.0.bias": (D,),
    "temporal_atte.w_qs.weight": (D, D),
    "temporal_atte.w_ks.weight": (D, D),
    "temporal_atte.w_vs.weight": (D, D),
    "temporal_atte.layer_norm.weight": (D,),
    "temporal_atte.layer_norm.bias": (D,),
    "temporal_atte.fc.weight": (D, D),
    "temporal_atte.fc.bias": (D,),
    "layer2.0.weight": (D, 2 * D, 1),
    "layer2.0.bias": (D,),
    "classification_layer.weight": (C, D),
    "classification_layer.bias": (C,),
}


@pytest.mark.parametrize("name", ["hyrsm", "hyrsm_pp"])
def test_the_state_dict_has_the_release_keys_and_loads_from_the_framework_checkpoint(name):
    head = make(name)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == RELEASE_KEYS
    official = to_official(head)
    assert set(official) == set(RELEASE_KEYS)
    other = make(name)
    torch.nn.init.zeros_(other.layer2[0].weight)
    load_official(other, {f"head.{k}": v for k, v in official.items()})
    for key, value in head.state_dict().items():
        close(other.state_dict()[key], value, 0)


def test_one_head_as_wide_as_the_input_has_no_output_projection_as_the_release():
    head = make("hyrsm", heads=1)
    assert not any(k.startswith("temporal_atte_before.fn.to_out") for k in head.state_dict())
    s, sl, q, ct, _ = make_episodes()
    assert torch.isfinite(run(head, s, sl, q, ct).logits).all()
