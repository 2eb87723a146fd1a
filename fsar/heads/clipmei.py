"""CLIP-MEI head: motion regulariser, query-adaptive prompts and task-level refinement + OTAM.

Follows D-XH/CLIP-MEI `models/model_clipmei.py` (`CNN` with `token_trans`). CLIP-SPM's head was
derived from it, so the parts that compute exactly the same thing are CLIP-SPM's
(`fsar.heads.clipspm_parts`): the paper's MIC is `HSMR` on the final embedding, QSA's prompt
generator `token_tr` is `PromptGenerator`, TFE (`context1` across videos) is `PADM`. What differs
is written here: MEI's fusion `se(x, u)` adds the token to every frame with a fixed weight and no
gates (CLIP-SPM gates both), and its consistency terms look at the queries only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fsar.errors import ConfigError

from .blocks import TRANSFORMER_KEYS, TransformerLayer
from .clipspm_parts import HSMR, PADM, PromptGenerator, squared_distance
from .otam import OTAM_LAMBDA, otam_distance
from .output import Episode, FewShotHead, HeadOutput
from .spec import BuildContext, HeadConfig, HeadSpec, OfficialKeys, option

__all__ = ["AdditiveFusion", "CLIPMEIHead", "CLIPMEIConfig", "SPEC"]


class AdditiveFusion(nn.Module):
    """MEI's `se(x, u)`: `z = TX2([u ; x + w * u])` over T+1 tokens, no gates (release w = 0.1).

    Same call as CLIP-SPM's `TextVideoFusion`, so `HSMR` runs on either.
    """

    def __init__(self, transformer: TransformerLayer, weight: float = 0.1):
        super().__init__()
        self.transformer = transformer
        self.weight = weight

    def forward(self, frames: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        """frames [V, T, D], token [V, D] -> (fused frames [V, T, D], fused token [V, D])."""
        token = token[:, None]  # [V, 1, D]
        z = self.transformer(torch.cat([token, frames + self.weight * token], dim=1))
        return z[:, 1:], z[:, 0]


class CLIPMEIHead(FewShotHead):
    """CLIP-MEI few-shot head.

    With `tau` the episode token, `p(v) = FFN(tau * mean(v))` the generated prompt of a video and
    `se` the additive fusion: `s_r = se(s, text of its class)`, `q_f = se(q, p(q))`;
    `logits = -(class_distance_weight * OTAM(class means of s_r, q_f) + PADM(s_r, q_f))`.

    The episode token. The release takes `tau` = mean text of the queries' classes, read from
    the query class ids even at test time. fsar's logits never read query labels or ids: `tau` is
    the mean of `class_text` over the episode's N classes. The two are equal whenever every class
    has equally many queries (the release's samplers, fsar's episodes, the golden files); with
    unequal query counts per class the release weights the classes by their query counts and its
    logits differ (tests/test_zoo_clipmei.py shows both cases).

    Transductive, as in the release: a query's logits depend on the other queries through PADM
    (every class anchor averages all queries; `context1` attends across the queries at each frame
    position). Permuting queries still permutes logit rows. PADM needs K supports in every class.

    Auxiliary terms (present when `query_labels` is given; each the mean over the B episodes of
    the release's per-episode term; their sum is the release's `dists`). With `tq` the text of a
    query's class, `q_real = se(q, tq)` and `t_real`, `t_fake` the fused tokens of `q_real`, `q_f`:

    - `aux["consistency"] = mean_q |[t_real ; q_real] - [t_fake ; q_f]|^2`;
    - `aux["text_distance"] = (mean_q |tq - p(q)|^2 + mean_q |t_real - t_fake|^2) / 2`;
    - `aux["motion_consistency"] = motion_alpha * L_mo` (`HSMR` with this fusion; the release's
      `mo_alpha1`, learned, initial value 1).

    Loss. The release adds `sum_q CE(logits) / tasks_per_batch + 0.001 * dists` per episode over
    tasks_per_batch episodes: a SUM over the Q queries. `episode_loss` takes the mean CE and the
    release's 0.001 on each aux term (the defaults), so next to the aux terms fsar's CE weighs
    Q / tasks_per_batch times less than the release's (Q times less for one task, as in the golden
    files, whose adapter weighs the CE by Q). For the release's exact balance, with B =
    tasks_per_batch episodes per step, set the aux weights to `0.001 * tasks_per_batch / Q`
    (0.0008 for its 16 tasks of 5-way episodes with 4 queries per class).
    """

    require_equal_shots = True

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        dim_head: int = 256,
        mlp_dim: int = 2048,
        prompt_hidden: int = 2048,
        fusion_weight: float = 0.1,
        class_distance_weight: float = 0.5,
        otam_lambda: float = OTAM_LAMBDA,
        attn_dropout: float = 0.2,
        ffn_dropout: float = 0.05,
    ):
        super().__init__()

        def transformer() -> TransformerLayer:
            return TransformerLayer(dim, heads, dim_head, mlp_dim, attn_dropout, ffn_dropout)

        self.fusion = AdditiveFusion(transformer(), fusion_weight)  # release context2
        self.prompt_generator = PromptGenerator(dim, prompt_hidden, ffn_dropout)  # token_tr
        self.padm = PADM(transformer(), otam_lambda)  # context1
        self.hsmr = HSMR(dim)  # motion_conv1, motion_conv2
        self.motion_alpha = nn.Parameter(torch.ones(1))  # mo_alpha1: [1] as in the release
        self.class_distance_weight = class_distance_weight
        self.otam_lambda = otam_lambda

    def compute(self, episode: Episode) -> HeadOutput:
        support, query = episode.support, episode.query
        episode_token = episode.class_text.mean(1)  # tau: [B, D]
        query_prompt = self.prompt_generator(episode_token, query)  # p(q): [B, Q, D]
        frames = [support, query]
        tokens = [episode.support_text(), query_prompt]
        training = episode.query_labels is not None
        if training:  # q_real = se(q, tq) feeds only the consistency terms
            frames.append(query)
            tokens.append(episode.query_text())
        fused, fused_tokens = self._fuse(frames, tokens)
        support_r, query_f = fused[0], fused[1]
        class_distance = otam_distance(
            query_f, episode.class_means(support_r), lam=self.otam_lambda
        )  # [B, Q, N]
        logits = -(
            self.class_distance_weight * class_distance + self.padm(episode, support_r, query_f)
        )
        aux: dict[str, Tensor] = {}
        if training:
            aux |= self._text_terms(tokens[2], query_prompt, fused[2], query_f, fused_tokens)
            motion = self.hsmr(self.fusion, support, query, support, query)
            aux["motion_consistency"] = (self.motion_alpha * motion).squeeze(0)
        return HeadOutput(logits, aux)

    def _fuse(
        self, frames: list[Tensor], tokens: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """One `se` call over every (videos [B,V,T,D], tokens [B,V,D]) pair of the lists."""
        fused, fused_tok = self.fusion(
            torch.cat([x.flatten(0, 1) for x in frames]),
            torch.cat([x.flatten(0, 1) for x in tokens]),
        )
        sizes = [x.shape[0] * x.shape[1] for x in frames]
        shapes = [x.shape[:2] for x in frames]
        return (
            [f.unflatten(0, s) for f, s in zip(fused.split(sizes), shapes, strict=True)],
            [f.unflatten(0, s) for f, s in zip(fused_tok.split(sizes), shapes, strict=True)],
        )

    @staticmethod
    def _text_terms(
        query_text: Tensor,
        query_prompt: Tensor,
        query_real: Tensor,
        query_fake: Tensor,
        fused_tokens: list[Tensor],
    ) -> dict[str, Tensor]:
        """The release's `consist_distance` and `text_distance` (queries only)."""
        token_fake, token_real = fused_tokens[1], fused_tokens[2]  # [B, Q, D]

        def dist(x: Tensor, y: Tensor) -> Tensor:  # mean over all B*Q queries = mean of means
            return squared_distance(x.flatten(0, 1), y.flatten(0, 1)).mean()

        def with_token(tok: Tensor, frames: Tensor) -> Tensor:
            return torch.cat([tok[:, :, None], frames], dim=2)  # [B, Q, T+1, D]

        return {
            "consistency": dist(
                with_token(token_real, query_real), with_token(token_fake, query_fake)
            ),
            "text_distance": 0.5 * (dist(query_text, query_prompt) + dist(token_real, token_fake)),
        }


@dataclass
class CLIPMEIConfig(HeadConfig):
    name: str = option("clipmei", "few-shot head")
    heads: int = option(8, "attention heads of context1/context2 (release 8)")
    dim_head: int = option(256, "width of one attention head (release 256 for RN50 and ViT-B/16)")
    mlp_dim: int = option(2048, "hidden width of the transformer FFNs (release 2048)")
    prompt_hidden: int = option(
        2048, "hidden width of the prompt generator token_tr (release 2048)"
    )
    attn_dropout: float = option(0.2, "attention dropout (training only)")
    ffn_dropout: float = option(0.05, "FFN and prompt-generator dropout (training only)")
    fusion_weight: float = option(
        0.1, "weight of the token added to every frame in se (release 0.1)"
    )
    class_distance_weight: float = option(
        0.5, "weight of OTAM(s_r, q_f) in the logits (release 0.5)"
    )
    otam_lambda: float = option(OTAM_LAMBDA, "OTAM soft-min temperature (release 0.5)")

    def check(self) -> None:
        for key in ("heads", "dim_head", "mlp_dim", "prompt_hidden"):
            if getattr(self, key) < 1:
                raise ConfigError(f"head.{key} must be >= 1, got {getattr(self, key)}")
        if self.otam_lambda <= 0:
            raise ConfigError(f"head.otam_lambda must be > 0, got {self.otam_lambda}")
        for key in ("attn_dropout", "ffn_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"head.{key} must be in [0, 1), got {getattr(self, key)}")


def build(config: CLIPMEIConfig, context: BuildContext) -> CLIPMEIHead:
    return CLIPMEIHead(
        context.feature_dim,  # the release's mid_dim: 1024 for RN50, 512 for ViT-B/16
        heads=config.heads,
        dim_head=config.dim_head,
        mlp_dim=config.mlp_dim,
        prompt_hidden=config.prompt_hidden,
        fusion_weight=config.fusion_weight,
        class_distance_weight=config.class_distance_weight,
        otam_lambda=config.otam_lambda,
        attn_dropout=config.attn_dropout,
        ffn_dropout=config.ffn_dropout,
    )


SPEC = HeadSpec(
    name="clipmei",
    title="CLIP-MEI",
    summary="motion regulariser, query-adaptive prompts, task refinement + OTAM (CLIP-MEI release)",
    citation="CLIP-MEI release (D-XH/CLIP-MEI)",
    tiny={"heads": 4, "dim_head": 16, "mlp_dim": 128, "prompt_hidden": 128},
    config=CLIPMEIConfig,
    build=build,
    head_type=CLIPMEIHead,
    # The release adds 0.001 * dists, dists = consistency + text_distance + mo_alpha1 * mo.
    aux_weights={"consistency": 0.001, "text_distance": 0.001, "motion_consistency": 0.001},
    official=OfficialKeys(
        release="CLIP-MEI",
        prefixes=(
            ("context1.", "padm.transformer.", TRANSFORMER_KEYS),
            ("context2.", "fusion.transformer.", TRANSFORMER_KEYS),
            ("token_tr.mlp.net.", "prompt_generator.ffn.", (("0.", "fc1."), ("3.", "fc2."))),
            ("motion_conv1.", "hsmr.motion.conv1.", (("", ""),)),
            ("motion_conv2.", "hsmr.motion.conv2.", (("", ""),)),
            ("mo_alpha1", "motion_alpha", (("", ""),)),
        ),
        # Its keys are CLIP-SPM's without the gates: see `reference._release_head`.
        markers=("context1.", "token_tr.", "motion_conv", "mo_alpha"),
        unused=lambda head: {"scale": torch.ones(1)},  # built, never used by the forward
    ),
)
