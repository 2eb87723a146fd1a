"""CLIP-MEI head: the release's formula (with query class ids) vs fsar's label-free logits.

`release_formula` below follows the release's `CNN.forward` step by step on one episode (per
class loops, a text table indexed by dataset class ids, the episode token = mean text of the
QUERIES' classes), reusing only the head's weights. fsar's head takes the mean text of the
episode's classes instead, so that its logits never read query labels: the two agree exactly when
every class has equally many queries, and differ otherwise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fsar.config import build_head_config
from fsar.errors import ConfigError
from fsar.heads import (
    BuildContext,
    EpisodeError,
    build_head,
    cos_sim,
    episode_loss,
    load_official,
    otam_bidirectional,
    spec_of,
    to_official,
)
from fsar.heads.clipmei import CLIPMEIHead
from fsar.torch_files import CheckpointError

D, T, WAY, SHOT, QPC, C = 32, 5, 4, 2, 2, 9
SMALL = dict(heads=2, dim_head=8, mlp_dim=48, prompt_hidden=40)


def make_head(dtype=torch.float64, **options) -> CLIPMEIHead:
    torch.manual_seed(0)
    head = CLIPMEIHead(D, **{**SMALL, **options}).to(dtype).eval()
    with torch.no_grad():  # away from the initial value 1, so a wrong use of it shows
        head.motion_alpha.fill_(0.7)
    return head


def make_episodes(b=2, query_labels=None, seed=0, dtype=torch.float64):
    """B shuffled episodes drawn from a C-class text table, as the samplers do.

    Returns a dict: support [B,S,T,D], support_labels [B,S], query [B,Q,T,D], query_labels [B,Q],
    class_text [B,N,D], and the release's view: text_table [C,D], support_ids/query_ids [B,*].
    """
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(C, D, generator=g, dtype=dtype)
    if query_labels is None:
        query_labels = torch.arange(WAY).repeat(QPC)
    support_labels = torch.stack(
        [torch.arange(WAY).repeat(SHOT)[torch.randperm(WAY * SHOT, generator=g)] for _ in range(b)]
    )
    query_labels = torch.stack(
        [query_labels[torch.randperm(len(query_labels), generator=g)] for _ in range(b)]
    )
    classes = torch.stack([torch.randperm(C, generator=g)[:WAY] for _ in range(b)])  # [B, N]
    class_text = table[classes]

    def videos(labels):
        centres = torch.gather(class_text, 1, labels[..., None].expand(-1, -1, D))
        noise = torch.randn(*labels.shape, T, D, generator=g, dtype=dtype)
        return 0.8 * noise + centres[:, :, None]

    return dict(
        support=videos(support_labels),
        support_labels=support_labels,
        query=videos(query_labels),
        query_labels=query_labels,
        class_text=class_text,
        text_table=table,
        support_ids=torch.gather(classes, 1, support_labels),
        query_ids=torch.gather(classes, 1, query_labels),
    )


def fsar_outputs(head, ep, with_labels=True):
    return head(
        ep["support"],
        ep["support_labels"],
        ep["query"],
        ep["class_text"],
        query_labels=ep["query_labels"] if with_labels else None,
    )


def release_formula(head, ep, b=0, token=None):
    """The release's logits [Q,N] and dists for episode b, from the query class ids.

    `token` [D] replaces the release's episode token (mean text of the queries' classes).
    """
    s, q, labels = ep["support"][b], ep["query"][b], ep["support_labels"][b]
    cs = ep["text_table"][ep["support_ids"][b]][:, None]  # [S, 1, D]
    tq = ep["text_table"][ep["query_ids"][b]][:, None]  # [Q, 1, D]
    tx1, tx2 = head.padm.transformer, head.fusion.transformer
    conv1, conv2 = head.hsmr.motion.conv1, head.hsmr.motion.conv2

    def se(x, u):  # x [V,T,D], u [V,1,D]
        z = tx2(torch.cat([u, x + 0.1 * u], dim=1))
        return z[:, 1:], z[:, :1]

    def motion(x):  # the release's get_motion_feats, channels first
        xc = x.permute(0, 2, 1)
        c = F.conv1d(
            F.conv1d(xc, conv1.weight, conv1.bias, padding=1), conv2.weight, conv2.bias, padding=1
        )
        return (0.5 * ((c[:, :, 1:] - xc[:, :, :-1]) + (c[:, :, :-1] - xc[:, :, 1:]))).mean(-1)

    def dis(x, y):
        return ((x - y) ** 2).flatten(1).sum(1).mean()

    def otam(protos, queries):  # [P,T,D], [Q,T,D] -> [Q,P]
        sim = cos_sim(queries.reshape(-1, D), protos.reshape(-1, D))
        d = (1 - sim).reshape(len(queries), T, len(protos), T).transpose(1, 2)
        return otam_bidirectional(d, 0.5)

    def class_means(x):
        return torch.stack([x[labels == c].mean(0) for c in torch.unique(labels)])

    # MIC: motion consistency through context2
    s_m, s_tok = se(s, motion(s)[:, None])
    q_m, q_tok = se(q, motion(q)[:, None])
    mo = dis(motion(q_m), q_tok[:, 0]) + dis(motion(s_m), s_tok[:, 0])
    # QSA: the episode token is the mean text of the queries' classes
    tau = tq.mean(0) if token is None else token[None]  # [1, D]
    prompt = head.prompt_generator.ffn(tau.expand(len(q), 1, D) * q.mean(dim=(1, 2))[:, None, None])
    q_real, t_real = se(q, tq)
    q_fake, t_fake = se(q, prompt)
    s_real, _ = se(s, cs)
    text = 0.5 * (dis(tq, prompt) + dis(t_real, t_fake))
    consist = dis(torch.cat([t_real, q_real], 1), torch.cat([t_fake, q_fake], 1))
    class_dists = otam(class_means(s_real), q_fake)
    # TFE: context1 across videos, per frame position
    per_class = torch.stack([s_real[labels == c] for c in torch.unique(labels)])  # [N,K,T,D]
    n = len(per_class)
    token_s = torch.cat([per_class, q_fake[None].expand(n, -1, -1, -1)], dim=1).mean(1)
    token_q = token_s.mean(0, keepdim=True)
    su = tx1(torch.cat([token_s, s_real]).permute(1, 0, 2)).permute(1, 0, 2)
    qu = tx1(torch.cat([token_q, q_fake]).permute(1, 0, 2)).permute(1, 0, 2)
    task = otam(class_means(su[n:]), qu[1:]) + otam(su[:n], qu[:1])
    logits = -(0.5 * class_dists + task)
    return logits, consist + text + head.motion_alpha * mo


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_logits_never_depend_on_query_labels():
    head, ep = make_head(), make_episodes()
    with torch.no_grad():
        without = fsar_outputs(head, ep, with_labels=False)
        with_true = fsar_outputs(head, ep)
        ep["query_labels"] = torch.zeros_like(ep["query_labels"])  # all queries "class 0"
        with_wrong = fsar_outputs(head, ep)
    assert without.aux == {}
    close(with_true.logits, without.logits, 0)
    close(with_wrong.logits, without.logits, 0)
    assert not torch.allclose(with_wrong.aux["text_distance"], with_true.aux["text_distance"])


@pytest.mark.parametrize("b", [0, 1])
def test_with_equally_many_queries_per_class_fsar_is_the_release(b):
    head, ep = make_head(), make_episodes()
    with torch.no_grad():
        out = fsar_outputs(head, ep)
        single = fsar_outputs(head, {k: v[b : b + 1] for k, v in ep.items() if k != "text_table"})
        logits, dists = release_formula(head, ep, b)
    close(out.logits[b], logits)
    close(sum(single.aux.values()).reshape(1), dists)


def test_with_unequal_query_counts_the_release_weights_classes_by_their_queries():
    unbalanced = torch.tensor([0, 0, 0, 0, 1, 2, 3])  # class 0 has 4 queries, the others 1
    head, ep = make_head(), make_episodes(query_labels=unbalanced)
    with torch.no_grad():
        out = fsar_outputs(head, ep)
        release, _ = release_formula(head, ep, 0)
        class_token = ep["class_text"][0].mean(0)
        release_with_class_token, _ = release_formula(head, ep, 0, token=class_token)
        query_token = ep["text_table"][ep["query_ids"][0]].mean(0)
    assert float((query_token - class_token).abs().max()) > 0.1  # the tokens differ
    assert float((release - out.logits[0]).abs().max()) > 1e-3  # and so do the logits
    close(out.logits[0], release_with_class_token)  # the token is the only difference


def test_the_aux_terms_are_the_release_dists_and_the_loss_is_its_loss():
    head, ep = make_head(), make_episodes(b=1)
    with torch.no_grad():
        out = fsar_outputs(head, ep)
        logits, dists = release_formula(head, ep, 0)
    spec = spec_of(head)
    assert (
        set(out.aux)
        == set(spec.aux_weights)
        == {
            "consistency",
            "text_distance",
            "motion_consistency",
        }
    )
    assert all(v.shape == () for v in out.aux.values())
    close(sum(out.aux.values()).reshape(1), dists)
    labels = ep["query_labels"]
    release_loss = F.cross_entropy(logits, labels[0], reduction="sum") + 0.001 * dists[0]
    n_queries = labels.shape[1]
    close(episode_loss(out, labels, {"logits": n_queries, **spec.aux_weights}), release_loss)
    # fsar's default loss: mean CE, the same 0.001 on the aux terms
    mean_ce = F.cross_entropy(logits, labels[0])
    close(episode_loss(out, labels, spec.aux_weights), mean_ce + 0.001 * dists[0])


def test_a_batch_of_episodes_gives_the_per_episode_results():
    head, ep = make_head(), make_episodes(b=3)
    with torch.no_grad():
        batch = fsar_outputs(head, ep)
        singles = [
            fsar_outputs(head, {k: v[i : i + 1] for k, v in ep.items() if k != "text_table"})
            for i in range(3)
        ]
    close(batch.logits, torch.cat([s.logits for s in singles]))
    for key, value in batch.aux.items():  # each aux term is the mean over the episodes
        close(value, torch.stack([s.aux[key] for s in singles]).mean())


def test_permutations_of_supports_queries_and_class_names():
    head, ep = make_head(), make_episodes()
    g = torch.Generator().manual_seed(3)
    s_perm = torch.randperm(WAY * SHOT, generator=g)
    q_perm = torch.randperm(WAY * QPC, generator=g)
    c_perm = torch.randperm(WAY, generator=g)  # new label n = old label c_perm[n]
    relabel = torch.argsort(c_perm)
    with torch.no_grad():
        ref = fsar_outputs(head, ep).logits
        permuted = head(
            ep["support"][:, s_perm],
            ep["support_labels"][:, s_perm],
            ep["query"][:, q_perm],
            ep["class_text"],
        ).logits
        renamed = head(
            ep["support"], relabel[ep["support_labels"]], ep["query"], ep["class_text"][:, c_perm]
        ).logits
    close(permuted, ref[:, q_perm])
    close(renamed, ref[:, :, c_perm])


def test_the_head_is_transductive_through_its_task_module():
    head, ep = make_head(), make_episodes(b=1)
    with torch.no_grad():
        ref = fsar_outputs(head, ep, with_labels=False).logits
        ep["query"][:, -1] += 1.0  # change one query: the others' logits move too
        moved = fsar_outputs(head, ep, with_labels=False).logits
    assert float((moved[:, :-1] - ref[:, :-1]).abs().max()) > 1e-6


def test_float32_matches_float64_and_training_mode_reaches_every_parameter():
    ep64 = make_episodes()
    ep32 = {k: v.float() if v.is_floating_point() else v for k, v in ep64.items()}
    with torch.no_grad():
        out64 = fsar_outputs(make_head(), ep64)
        out32 = fsar_outputs(make_head(torch.float32), ep32)
    torch.testing.assert_close(out32.logits.double(), out64.logits, rtol=1e-4, atol=1e-4)
    head = make_head().train()  # dropout on
    out = fsar_outputs(head, ep64)
    episode_loss(out, ep64["query_labels"], spec_of(head).aux_weights).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_unequal_shots_are_refused():
    head, ep = make_head(), make_episodes(b=1)
    labels = ep["support_labels"].clone()
    labels[0, labels[0] == 1] = torch.tensor([1, 0])  # class 0: 3 supports, class 1: 1
    with pytest.raises(EpisodeError, match="same number of supports"):
        head(ep["support"], labels, ep["query"], ep["class_text"])


def test_config_defaults_are_the_release_and_bad_values_raise():
    config = build_head_config({"name": "clipmei"})
    assert (config.heads, config.dim_head, config.mlp_dim, config.prompt_hidden) == (
        8,
        256,
        2048,
        2048,
    )
    assert (config.fusion_weight, config.class_distance_weight, config.otam_lambda) == (
        0.1,
        0.5,
        0.5,
    )
    head = build_head(config, BuildContext(D))
    assert isinstance(head, CLIPMEIHead) and head.require_equal_shots
    assert head.padm.transformer.attn.to_q.weight.shape == (8 * 256, D)
    for bad in ({"otam_lambda": 0.0}, {"dim_head": 0}, {"attn_dropout": 1.0}):
        with pytest.raises(ConfigError, match=f"head.{next(iter(bad))}"):
            build_head_config({"name": "clipmei", **bad}).check()


def test_options_reach_the_maths():
    ep = make_episodes(b=1)
    with torch.no_grad():
        ref = fsar_outputs(make_head(), ep, with_labels=False).logits
        for option in (
            {"fusion_weight": 0.3},
            {"class_distance_weight": 0.2},
            {"otam_lambda": 0.2},
        ):
            other = fsar_outputs(make_head(**option), ep, with_labels=False).logits
            assert float((other - ref).abs().max()) > 1e-6, option


def test_official_checkpoints_of_clipmei_and_clipspm_are_told_apart():
    mei = make_head(torch.float32)
    state = to_official(mei)
    assert "scale" in state and "mo_alpha1" in state and state["mo_alpha1"].shape == (1,)
    spm = build_head(build_head_config({"name": "clipspm", **SMALL}), BuildContext(D))
    with pytest.raises(CheckpointError, match="--head clipmei"):
        load_official(spm, state)
    spm_state = to_official(spm)
    spm_state["mo_alpha1"] = torch.ones(1)  # the release's shape
    with pytest.raises(CheckpointError, match="--head clipspm"):
        load_official(make_head(torch.float32), spm_state)
    fresh = build_head(build_head_config({"name": "clipmei", **SMALL}), BuildContext(D))
    load_official(fresh, state)
    for key, value in to_official(fresh).items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
