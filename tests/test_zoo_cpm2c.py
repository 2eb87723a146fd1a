"""The cpm2c head (CLIP-SPM's CLIP_CPMMC_FSAR): contract, what reads labels, release quirks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsar.config import build_head_config
from fsar.errors import ConfigError
from fsar.heads import (
    BuildContext,
    CLIPSPMHead,
    Episode,
    EpisodeError,
    HeadOutput,
    build_head,
    cos_sim,
    episode_loss,
    load_official,
    to_official,
)
from fsar.heads.cpm2c import AUX_WEIGHTS, SPEC, CPM2CHead
from fsar.heads.cpm2c_parts import MultiScaleMotion, conv_frames_last
from fsar.heads.otam import otam_bidirectional
from fsar.torch_files import CheckpointError
from tests.test_heads_contract import QPC, WAY, D, close, make_episodes

N_TABLE = 10  # training classes in the text table


def make_head(dtype=torch.float64, **options) -> CPM2CHead:
    torch.manual_seed(0)
    config = build_head_config({"name": "cpm2c", **options})
    return build_head(config, BuildContext(D, {}, N_TABLE)).to(dtype).eval()


def run(head, s, sl, q, ct, ql=None, **extra) -> HeadOutput:
    with torch.no_grad():
        return head(s, sl, q, ct, query_labels=ql, **extra)


def class_inputs(sl, ql, dtype=torch.float64, seed=3):
    """Dataset ids (episode label n -> table row n + 3 of a random table) and the table."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(N_TABLE, D, generator=g, dtype=dtype)
    return dict(support_class_ids=sl + 3, query_class_ids=ql + 3, text_table=table)


def test_default_head_gives_b_q_n_logits_and_the_release_aux_terms():
    head = make_head()
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql, **class_inputs(sl, ql))
    assert out.logits.shape == (2, WAY * QPC, WAY)
    assert set(out.aux) == {"classification", "local", "global", "consistency"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.aux.values())
    assert run(head, s, sl, q, ct).aux == {}
    assert set(run(head, s, sl, q, ct, **class_inputs(sl, ql)).aux) == {"classification"}
    assert set(run(head, s, sl, q, ct, ql).aux) == {"local", "global", "consistency"}


def test_permutations_and_class_renaming():
    head = make_head()
    s, sl, q, ct, ql = make_episodes()
    out = run(head, s, sl, q, ct, ql, **class_inputs(sl, ql))
    ps, pq = torch.randperm(s.shape[1]), torch.randperm(q.shape[1])
    permuted = run(
        head, s[:, ps], sl[:, ps], q[:, pq], ct, ql[:, pq], **class_inputs(sl[:, ps], ql[:, pq])
    )
    close(permuted.logits, out.logits[:, pq])
    for key in out.aux:
        close(permuted.aux[key], out.aux[key])
    perm = torch.randperm(WAY)  # old label n becomes perm[n]
    renamed = run(head, s, perm[sl], q, ct[:, torch.argsort(perm)], perm[ql])
    close(renamed.logits[..., perm], out.logits)


def test_logits_read_neither_query_labels_nor_query_class_ids():
    """The release reads the query class ids in forward; they reach only the training terms."""
    head = make_head()
    s, sl, q, ct, ql = make_episodes()
    inputs = class_inputs(sl, ql)
    base = run(head, s, sl, q, ct, ql, **inputs)
    other_labels = torch.roll(ql, 1, dims=1)
    other_ids = dict(inputs, query_class_ids=torch.full_like(ql, 9))
    changed = run(head, s, sl, q, ct, other_labels, **other_ids)
    close(changed.logits, base.logits, 0)
    close(run(head, s, sl, q, ct).logits, base.logits, 0)
    assert changed.aux["consistency"] != base.aux["consistency"]
    assert changed.aux["classification"] != base.aux["classification"]
    # the classification term reads the class ids, never the episode labels
    relabelled = run(head, s, sl, q, ct, other_labels, **inputs)
    assert relabelled.aux["classification"] == base.aux["classification"]


def test_a_batch_equals_its_episodes_and_float32_matches_float64():
    head = make_head()
    s, sl, q, ct, ql = make_episodes(b=3, seed=4)
    inputs = class_inputs(sl, ql)
    out = run(head, s, sl, q, ct, ql, **inputs)
    singles = [
        run(
            head,
            s[i : i + 1],
            sl[i : i + 1],
            q[i : i + 1],
            ct[i : i + 1],
            ql[i : i + 1],
            support_class_ids=inputs["support_class_ids"][i : i + 1],
            query_class_ids=inputs["query_class_ids"][i : i + 1],
            text_table=inputs["text_table"],
        )
        for i in range(3)
    ]
    close(out.logits, torch.cat([o.logits for o in singles]))
    for key in out.aux:
        close(out.aux[key], torch.stack([o.aux[key] for o in singles]).mean())
    out32 = run(make_head(torch.float32), s.float(), sl, q.float(), ct.float(), ql)
    torch.testing.assert_close(out32.logits.double(), out.logits, rtol=1e-4, atol=1e-4)


def test_multiscale_motion_equals_the_convolutions_over_time():
    torch.manual_seed(0)
    motion = MultiScaleMotion(16, residual_ratio=0.3).double()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    xc = x.transpose(1, 2)  # [V, D, T], as nn.Conv1d takes it
    for conv in (motion.conv_k1, motion.conv_k3, motion.conv_dilated):
        close(conv_frames_last(conv, x), conv(xc).transpose(1, 2))
    scales = torch.cat([motion.conv_k1(xc), motion.conv_k3(xc), motion.conv_dilated(xc)], dim=1)
    fused = (motion.merge(scales) * 0.3 + xc).transpose(1, 2)  # [V, T, D]
    expected = 0.5 * ((fused[:, 1:] - x[:, :-1]) + (fused[:, :-1] - x[:, 1:]))
    close(motion(x), expected)
    assert motion(x).shape == (3, 6, 16)


def test_local_and_global_scores_equal_a_loop_over_classes():
    """Vectorised scores == the release's per-class loop on the fused representations."""
    head = make_head(normal_coff=1.0, motion_coff=0.0)  # appearance branch only
    s, sl, q, ct, _ = make_episodes(b=1)
    episode = Episode.checked(s, sl, q, ct)
    with torch.no_grad():
        scores = head.scores(episode)
        token = head.appearance_token[0, 0]
        support = head._fuse(s, episode.support_text())[0]  # [S, T+1, D]
        query = head._fuse(q, token.expand(1, q.shape[1], -1))[0]  # [Q, T+1, D]
        for n in range(WAY):
            members = (sl[0] == n).nonzero()[:, 0]
            proto = support[members].mean(0)[1:]  # [T, D]
            dists = 1 - cos_sim(query[:, 1:], proto[None])  # [Q, T, T]
            close(scores.logits_local[0, :, n], -otam_bidirectional(dists))
            token_dists = 1 - cos_sim(query, support[members, 0][None])  # [Q, T+1, shots]
            close(scores.logits_global[0, :, n], -token_dists.sum((1, 2)))


def test_global_distance_sums_over_the_supports_of_a_class():
    """Release quirk: two copies of each support double the global distance; local is a mean."""
    head = make_head()
    s, sl, q, ct, _ = make_episodes(b=1, shot=1)
    with torch.no_grad():
        one = head.scores(Episode.checked(s, sl, q, ct))
        two = head.scores(Episode.checked(s.repeat(1, 2, 1, 1), sl.repeat(1, 2), q, ct))
    close(two.logits_global, 2 * one.logits_global)
    close(two.logits_local, one.logits_local)


def test_logit_weights_and_branch_weights():
    s, sl, q, ct, ql = make_episodes()
    head = make_head(global_weight=0.5, local_weight=2.0)
    with torch.no_grad():
        scores = head.scores(Episode.checked(s, sl, q, ct))
        close(
            run(head, s, sl, q, ct).logits, 2.0 * scores.logits_local + 0.5 * scores.logits_global
        )
    # normal_coff 0 (the release's ucf.yaml): the appearance token no longer matters
    motion_only = make_head(normal_coff=0.0)
    before = run(motion_only, s, sl, q, ct, ql)
    with torch.no_grad():
        motion_only.appearance_token.add_(1.0)
    after = run(motion_only, s, sl, q, ct, ql)
    close(after.logits, before.logits)
    close(after.aux["consistency"], before.aux["consistency"])


def test_the_release_loss_and_a_training_step_reaching_every_parameter():
    head = make_head().train()
    s, sl, q, ct, ql = make_episodes()
    out = head(s, sl, q, ct, query_labels=ql, **class_inputs(sl, ql))
    loss = episode_loss(out, ql, SPEC.aux_weights)
    expected = 0.5 * out.aux["classification"] + out.aux["local"] + 0.001 * out.aux["consistency"]
    close(loss, expected)
    loss.backward()
    missing = [
        n for n, p in head.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, f"no finite gradient for {missing}"
    # aux["local"]: the per-episode sum of CE (the release's utils.loss), averaged over episodes;
    # the default logits are the local logits (local_weight 1, global_weight 0)
    summed = F.cross_entropy(out.logits.flatten(0, 1), ql.flatten(), reduction="sum")
    close(out.aux["local"], summed / 2)
    assert AUX_WEIGHTS["logits"] == 0.0


def test_bad_inputs_raise_episode_errors():
    head = make_head()
    s, sl, q, ct, ql = make_episodes()
    with pytest.raises(EpisodeError, match="T=2"):
        run(head, s[:, :, :1], sl, q[:, :, :1], ct)
    inputs = class_inputs(sl, ql)
    with pytest.raises(EpisodeError, match="together"):
        run(head, s, sl, q, ct, support_class_ids=inputs["support_class_ids"])
    with pytest.raises(EpisodeError, match="rows of text_table"):
        run(head, s, sl, q, ct, **dict(inputs, query_class_ids=ql + 7))
    with pytest.raises(EpisodeError, match=r"\[C,D=32\]"):
        run(head, s, sl, q, ct, **dict(inputs, text_table=inputs["text_table"][:, :5]))
    with pytest.raises(EpisodeError, match="class ids must be"):
        run(head, s, sl, q, ct, **dict(inputs, query_class_ids=ql[:, :3]))
    unequal = sl.clone()
    unequal[:, :] = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])  # unequal shots are allowed
    assert run(head, s, unequal, q, ct).logits.shape == (2, WAY * QPC, WAY)


def test_config_checks_values():
    for bad in ({"heads": 0}, {"dim_head": 0}, {"ffn_dropout": 1.0}, {"mid_dim_text": 0.0}):
        config = build_head_config({"name": "cpm2c", **bad})
        with pytest.raises(ConfigError, match="head."):
            config.check()
    assert make_head(dim_head=3).fusion.transformer.attn.dim_head == 3
    assert make_head().fusion.transformer.attn.dim_head == D // 8  # the release's D/8


def test_official_state_dict_loads_with_the_release_only_entries_and_names_the_head():
    head = make_head(torch.float32)
    official = to_official(head)
    assert "class_token_motion" in official and "scale_conv.weight" in official
    assert official["transformer.resblocks.5.ln_2.weight"].shape == (D,)
    assert official["frame_position_embeddings.weight"].shape == (77, D)
    other = make_head(torch.float32)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    release = dict(official, **{"backbone.conv1.weight": torch.zeros(3)})
    assert load_official(other, release) == []
    for (name, a), b in zip(head.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    with pytest.raises(CheckpointError, match="--head cpm2c"):
        load_official(CLIPSPMHead(D, heads=2, dim_head=8, mlp_dim=48, prompt_hidden=40), official)


ZOO = Path(__file__).resolve().parents[2] / "shared/golden/zoo"


@pytest.mark.skipif(not list(ZOO.glob("cpm2c_*.json")), reason=f"no cpm2c golden files in {ZOO}")
def test_defaults_are_the_release_values_the_golden_files_were_made_with():
    from tests.zoo_adapters import cpm2c as adapter

    defaults = build_head_config({"name": "cpm2c"})
    for path in sorted(ZOO.glob("cpm2c_*.json")):
        settings = json.loads(path.read_text())
        assert adapter.loss_weights(settings) == dict(SPEC.aux_weights), path.name
        options = adapter.head_options(settings)
        differ = {k for k, v in options.items() if getattr(defaults, k) != v}
        assert differ == {"dim_head", "mlp_dim"}, path.name  # the golden's D = 64 sizes
        assert options["dim_head"] == settings["D"] // 8  # what dim_head=None gives
