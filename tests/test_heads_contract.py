"""One contract for every head: shapes, permutations, batching, labels, ablations, bad inputs."""

from __future__ import annotations

import pytest
import torch

from fsar.heads import HEADS as HEAD_SPECS
from fsar.heads import (
    BuildContext,
    CLIPFSARHead,
    CLIPSPMHead,
    EpisodeError,
    HeadOutput,
    OTAMHead,
    build_head,
    episode_loss,
)
from fsar.heads.registry import head_config

D, T, WAY, SHOT, QPC = 32, 5, 4, 2, 2
SMALL_SPM = dict(heads=2, dim_head=8, mlp_dim=48, prompt_hidden=40)

NUM_CLASSES = 10  # training classes of the per-class layers (HyRSM's frame classifier)


def _registered(name: str):
    spec = HEAD_SPECS[name]
    return lambda: build_head(head_config(name, **spec.tiny), BuildContext(D, {}, NUM_CLASSES))


# name -> factory; every head here must satisfy the whole contract: every registered head with
# its tiny widths, then variants of their switches.
HEADS = {name: _registered(name) for name in HEAD_SPECS} | {
    "otam_one_way": lambda: OTAMHead(bidirectional=False),
    "otam_prototype": lambda: OTAMHead(lam=0.5, prototype=True),
    "clipfsar_merge_before": lambda: CLIPFSARHead(D, mlp_dim=48, merge_before=True),
    "clipfsar_fusion": lambda: CLIPFSARHead(D, mlp_dim=48, fusion_beta=0.9),
    "clipspm_small": lambda: CLIPSPMHead(D, **SMALL_SPM),
    "clipspm_no_hsmr": lambda: CLIPSPMHead(D, **SMALL_SPM, hsmr=False),
    "clipspm_no_spm": lambda: CLIPSPMHead(D, **SMALL_SPM, spm="none"),
    "clipspm_no_padm": lambda: CLIPSPMHead(D, **SMALL_SPM, padm=False),
    "clipspm_learnable_alpha": lambda: CLIPSPMHead(D, **SMALL_SPM, motion_alpha_learnable=True),
    "clipspm_consistency": lambda: CLIPSPMHead(
        D, **SMALL_SPM, consistency_weight=1.0, text_distance_weight=1.0
    ),
}


def make_head(name: str, dtype=torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return HEADS[name]().to(dtype).eval()


def make_episodes(b=2, way=WAY, shot=SHOT, qpc=QPC, t=T, d=D, seed=0, dtype=torch.float64):
    """B shuffled episodes: support [B,S,T,D], labels, query [B,Q,T,D], class_text, query_labels."""
    g = torch.Generator().manual_seed(seed)
    support_labels = torch.stack(
        [torch.arange(way).repeat(shot)[torch.randperm(way * shot, generator=g)] for _ in range(b)]
    )
    query_labels = torch.stack(
        [torch.arange(way).repeat(qpc)[torch.randperm(way * qpc, generator=g)] for _ in range(b)]
    )
    class_text = torch.randn(b, way, d, generator=g, dtype=dtype)
    # class-dependent features so that the episodes are not pure noise
    support = (
        torch.randn(b, way * shot, t, d, generator=g, dtype=dtype)
        + torch.gather(class_text, 1, support_labels[..., None].expand(-1, -1, d))[:, :, None]
    )
    query = (
        torch.randn(b, way * qpc, t, d, generator=g, dtype=dtype)
        + torch.gather(class_text, 1, query_labels[..., None].expand(-1, -1, d))[:, :, None]
    )
    return support, support_labels, query, class_text, query_labels


def run(head, support, support_labels, query, class_text, query_labels=None) -> HeadOutput:
    with torch.no_grad():
        return head(support, support_labels, query, class_text, query_labels=query_labels)


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", HEADS)
def test_head_returns_logits_of_shape_b_q_n_and_scalar_aux(name):
    head = make_head(name)
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql)
    assert out.logits.shape == (2, WAY * QPC, WAY)
    assert torch.isfinite(out.logits).all()
    for key, value in out.aux.items():
        assert value.dim() == 0 and torch.isfinite(value), key


@pytest.mark.parametrize("name", HEADS)
def test_permuting_supports_changes_nothing_and_permuting_queries_permutes_rows(name):
    head = make_head(name)
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql)
    ps, pq = torch.randperm(s.shape[1]), torch.randperm(q.shape[1])
    permuted = run(head, s[:, ps], sl[:, ps], q[:, pq], ct, ql[:, pq])
    close(permuted.logits, out.logits[:, pq])
    assert permuted.aux.keys() == out.aux.keys()
    for key in out.aux:
        close(permuted.aux[key], out.aux[key])


@pytest.mark.parametrize("name", HEADS)
def test_renaming_the_classes_permutes_the_logit_columns(name):
    head = make_head(name)
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql)
    perm = torch.randperm(WAY)  # old label n becomes perm[n]
    inverse = torch.argsort(perm)
    renamed = run(head, s, perm[sl], q, ct[:, inverse], perm[ql])
    close(renamed.logits[..., perm], out.logits)


@pytest.mark.parametrize("name", HEADS)
def test_logits_never_depend_on_query_labels(name):
    head = make_head(name)
    s, sl, q, ct, ql = make_episodes()
    without = run(head, s, sl, q, ct)
    with_labels = run(head, s, sl, q, ct, ql)
    other = run(head, s, sl, q, ct, torch.roll(ql, 1, dims=1))
    close(with_labels.logits, without.logits, 0)
    close(other.logits, without.logits, 0)


@pytest.mark.parametrize("name", HEADS)
def test_a_batch_of_episodes_gives_the_per_episode_results(name):
    head = make_head(name)
    s, sl, q, ct, ql = make_episodes(b=3, seed=4)
    out = run(head, s, sl, q, ct, ql)
    singles = [
        run(head, s[i : i + 1], sl[i : i + 1], q[i : i + 1], ct[i : i + 1], ql[i : i + 1])
        for i in range(3)
    ]
    close(out.logits, torch.cat([o.logits for o in singles]))
    for key in out.aux:
        close(out.aux[key], torch.stack([o.aux[key] for o in singles]).mean())


@pytest.mark.parametrize("name", HEADS)
def test_head_runs_in_float32_and_matches_float64(name):
    s, sl, q, ct, ql = make_episodes()
    out64 = run(make_head(name, torch.float64), s, sl, q, ct, ql)
    out32 = run(make_head(name, torch.float32), s.float(), sl, q.float(), ct.float(), ql)
    torch.testing.assert_close(out32.logits.double(), out64.logits, rtol=1e-4, atol=1e-4)


def training_inputs(name: str, sl: torch.Tensor, ql: torch.Tensor) -> dict[str, torch.Tensor]:
    """The training-only inputs a registered head declares (class ids into a text table)."""
    spec = HEAD_SPECS[name]
    if not spec.training_inputs(head_config(name, **spec.tiny)).class_ids:
        return {}
    table = torch.randn(NUM_CLASSES, D, dtype=torch.float64)
    return dict(support_class_ids=sl + 3, query_class_ids=ql + 3, text_table=table)


@pytest.mark.parametrize(
    "name", [n for n in HEAD_SPECS if any(True for _ in HEADS[n]().parameters())]
)
def test_a_training_step_reaches_every_parameter(name):
    head = make_head(name).train()
    s, sl, q, ct, ql = make_episodes()
    out = head(s, sl, q, ct, query_labels=ql, **training_inputs(name, sl, ql))
    episode_loss(out, ql, {k: 0.001 for k in out.aux}).backward()
    missing = [
        n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, f"no finite gradient for {missing}"


@pytest.mark.parametrize("name", [n for n in HEADS if n.startswith("clipspm")])
def test_clipspm_aux_terms_appear_only_with_query_labels(name):
    head = make_head(name)
    s, sl, q, ct, ql = make_episodes()
    assert run(head, s, sl, q, ct).aux == {}
    aux = run(head, s, sl, q, ct, ql).aux
    assert ("motion_consistency" in aux) == (head.hsmr is not None)
    assert ("consistency" in aux) == ("text_distance" in aux) == (name == "clipspm_consistency")


@pytest.mark.parametrize("switch", ["spm_none", "no_padm", "fsar_merge_before"])
def test_each_ablation_switch_gives_a_working_head_with_different_logits(switch):
    builders = {
        "spm_none": (
            lambda: CLIPSPMHead(D, **SMALL_SPM),
            lambda: CLIPSPMHead(D, **SMALL_SPM, spm="none"),
        ),
        "no_padm": (
            lambda: CLIPSPMHead(D, **SMALL_SPM),
            lambda: CLIPSPMHead(D, **SMALL_SPM, padm=False),
        ),
        "fsar_merge_before": (
            lambda: CLIPFSARHead(D, mlp_dim=48),
            lambda: CLIPFSARHead(D, mlp_dim=48, merge_before=True),
        ),
    }
    full_builder, ablated_builder = builders[switch]
    torch.manual_seed(0)
    full = full_builder().double().eval()
    ablated = ablated_builder().double().eval()
    shared = {k: v for k, v in full.state_dict().items() if k in ablated.state_dict()}
    ablated.load_state_dict(shared, strict=False)  # same weights wherever both have them
    s, sl, q, ct, ql = make_episodes()
    a, b = run(full, s, sl, q, ct), run(ablated, s, sl, q, ct)
    assert torch.isfinite(b.logits).all()
    assert (a.logits - b.logits).abs().max() > 1e-6


def test_hsmr_switch_removes_the_motion_loss_and_its_parameters():
    torch.manual_seed(0)
    full = CLIPSPMHead(D, **SMALL_SPM).double().eval()
    ablated = CLIPSPMHead(D, **SMALL_SPM, hsmr=False).double().eval()
    ablated.load_state_dict(
        {k: v for k, v in full.state_dict().items() if k in ablated.state_dict()}
    )
    s, sl, q, ct, ql = make_episodes()
    a, b = run(full, s, sl, q, ct, ql), run(ablated, s, sl, q, ct, ql)
    # HSMR is a training regulariser: inference logits are the same, the loss is not
    close(a.logits, b.logits)
    assert "motion_consistency" in a.aux and "motion_consistency" not in b.aux
    assert not any("motion" in n for n, _ in ablated.named_parameters())
    assert episode_loss(a, ql, {k: 0.001 for k in a.aux}) != episode_loss(
        b, ql, {k: 0.001 for k in b.aux}
    )


def test_hsmr_from_an_intermediate_layer_uses_the_shallow_inputs():
    torch.manual_seed(0)
    head = CLIPSPMHead(D, **SMALL_SPM, hsmr_source="layer:blocks.6", shallow_dim=24).double().eval()
    s, sl, q, ct, ql = make_episodes()
    g = torch.Generator().manual_seed(9)
    s_shallow = torch.randn(*s.shape[:3], 24, generator=g, dtype=torch.float64)
    q_shallow = torch.randn(*q.shape[:3], 24, generator=g, dtype=torch.float64)
    out = head(s, sl, q, ct, query_labels=ql, support_shallow=s_shallow, query_shallow=q_shallow)
    other = head(
        s, sl, q, ct, query_labels=ql, support_shallow=s_shallow * 2, query_shallow=q_shallow
    )
    assert out.aux["motion_consistency"] != other.aux["motion_consistency"]
    close(out.logits, other.logits)
    with pytest.raises(EpisodeError, match="needs support_shallow"):
        head(s, sl, q, ct, query_labels=ql)
    with pytest.raises(EpisodeError, match="support_shallow"):
        head(
            s,
            sl,
            q,
            ct,
            query_labels=ql,
            support_shallow=s_shallow[:, :, :3],
            query_shallow=q_shallow,
        )
    with pytest.raises(EpisodeError, match="hsmr_source is 'final'"):
        make_head("clipspm")(
            s, sl, q, ct, query_labels=ql, support_shallow=s_shallow, query_shallow=q_shallow
        )


def test_bad_constructor_switches_raise_with_the_choices():
    with pytest.raises(ValueError, match="generated"):
        CLIPSPMHead(D, spm="real")
    with pytest.raises(ValueError, match="layer:<name>"):
        CLIPSPMHead(D, hsmr_source="shallow")
    with pytest.raises(ValueError, match="shallow_dim"):
        CLIPSPMHead(D, hsmr_source="layer:blocks.3")
    with pytest.raises(ValueError, match="fusion_beta"):
        CLIPFSARHead(D, fusion_beta=1.5)


def _bad_inputs():
    s, sl, q, ct, ql = make_episodes()
    unequal = sl.clone()
    unequal[:, :] = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])  # 3/2/2/1 shots
    no_class_3 = sl.clone()
    no_class_3[no_class_3 == 3] = 2
    return {
        "T mismatch": ((s, sl, q[:, :, :-1], ct, None), "T="),
        "D mismatch": ((s, sl, q[..., :-1], ct, None), "feature dims"),
        "class_text D mismatch": ((s, sl, q, ct[..., :-1], None), "feature dims"),
        "support label too large": ((s, torch.where(sl == 3, 4, sl), q, ct, None), r"0\.\.3"),
        "negative query label": ((s, sl, q, ct, ql - 1), r"query_labels must lie in 0\.\.3"),
        "class without supports": (
            (s, no_class_3, q, ct, None),
            "class 3 of episode 0 has no support",
        ),
        "unbatched support": ((s[0], sl[0], q[0], ct[0], None), "leading episode dimension"),
        "float labels": ((s, sl.double(), q, ct, None), "integer"),
        "episode count mismatch": ((s, sl, q[:1], ct, None), "episode counts"),
        "labels shape": ((s, sl[:, :-1], q, ct, None), "support_labels must be"),
        "unequal shots": ((s, unequal, q, ct, None), "same number of supports"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
@pytest.mark.parametrize("name", HEADS)
def test_bad_inputs_raise_one_clear_error(name, case):
    (s, sl, q, ct, ql), message = _bad_inputs()[case]
    head = make_head(name)
    if case == "unequal shots" and not head.require_equal_shots:
        assert run(head, s, sl, q, ct, ql).logits.shape == (2, q.shape[1], WAY)
        return
    with pytest.raises(EpisodeError, match=message):
        run(head, s, sl, q, ct, ql)


def test_clipfsar_video_text_term_and_fusion():
    torch.manual_seed(0)
    head = (
        CLIPFSARHead(D, mlp_dim=48, fusion_beta=0.9, attn_dropout=0.0, ffn_dropout=0.0)
        .double()
        .eval()
    )
    s, sl, q, ct, ql = make_episodes()
    table = torch.randn(10, D, dtype=torch.float64)
    assert head.video_text_logits(s, table).shape == (2, s.shape[1], 10)
    with pytest.raises(EpisodeError, match="together"):
        head(s, sl, q, ct, support_class_ids=sl)
    with pytest.raises(EpisodeError, match="rows of text_table"):
        head(s, sl, q, ct, support_class_ids=sl + 9, query_class_ids=ql, text_table=table)
    out = head(s, sl, q, ct, support_class_ids=sl, query_class_ids=ql, text_table=table)
    assert out.aux["video_text"].dim() == 0
    # eval: the release's fused probabilities p_text^beta * p_fewshot^(1-beta), in (0, 1]
    assert ((out.logits > 0) & (out.logits <= 1)).all()
    # training: no fusion, the plain -OTAM logits
    plain = CLIPFSARHead(D, mlp_dim=48, attn_dropout=0.0, ffn_dropout=0.0).double().eval()
    plain.load_state_dict(head.state_dict())
    close(head.train()(s, sl, q, ct).logits, plain(s, sl, q, ct).logits)


@pytest.mark.parametrize("frames", [2, 3, 8])
def test_motion_module_closed_form_equals_the_convolutions_over_time(frames):
    """The closed form (weighted time sums through the linear convolutions) = the direct form."""
    from fsar.heads import MotionModule

    torch.manual_seed(frames)
    motion = MotionModule(16).double()
    x = torch.randn(2, 3, frames, 16, dtype=torch.float64, requires_grad=True)

    def direct(frames_x: torch.Tensor) -> torch.Tensor:
        seq = frames_x.reshape(-1, frames, 16).transpose(1, 2)  # [V, D, T]
        c = motion.conv2(motion.conv1(seq)).transpose(1, 2)  # [V, T, D]
        v = frames_x.reshape(-1, frames, 16)
        m = 0.5 * ((c[:, 1:] - v[:, :-1]) + (c[:, :-1] - v[:, 1:]))
        return m.mean(1).reshape(2, 3, 16)

    grad = torch.randn(2, 3, 16, dtype=torch.float64)
    got = motion(x)
    got_grads = torch.autograd.grad(got, [x, *motion.parameters()], grad)
    expected = direct(x)
    expected_grads = torch.autograd.grad(expected, [x, *motion.parameters()], grad)
    close(got, expected)
    for a, b in zip(got_grads, expected_grads, strict=True):
        close(a, b)


def test_cpu_dropout_drops_at_rate_p_keeps_the_mean_and_is_seeded():
    from fsar.heads.blocks import Dropout

    for p in (0.05, 0.2, 0.5):
        drop = Dropout(p).train()
        x = torch.full((1000, 1000), 2.0, requires_grad=True)
        torch.manual_seed(1)
        y = drop(x)
        dropped = (y == 0).double().mean().item()
        sigma = (p * (1 - p) / x.numel()) ** 0.5
        assert abs(dropped - p) < 5 * sigma, (p, dropped)
        kept = y[y != 0]
        # kept values are scaled by the inverse of the (2**-16-rounded) keep probability
        assert torch.allclose(kept, torch.full_like(kept, 2.0 / (1 - round(p * 65536) / 65536)))
        y.backward(torch.ones_like(y))
        assert torch.equal(x.grad, y.detach() / 2.0)  # gradient = mask * scale
        torch.manual_seed(1)
        assert torch.equal(drop(x), y)  # the global seed decides the mask
    x = torch.randn(5, 7)
    assert torch.equal(Dropout(0.3).eval()(x), x)
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_every_dropout_of_the_heads_is_the_fast_one():
    from fsar.heads.blocks import Dropout

    for name in ("clipfsar", "clipspm"):
        drops = [m for m in HEADS[name]().modules() if isinstance(m, torch.nn.Dropout)]
        assert drops and all(isinstance(m, Dropout) for m in drops), name
