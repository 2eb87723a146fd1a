"""What the shared sources give for the zoo heads' experiment files (configs/make_experiments.py
writes them): per head, its options with the source of every value, the options left at fsar's
defaults and why, and what the feature width D (RN50 1024, ViT-B/16 512) means for it.

Sources, in the shared folder beside the repository: golden/zoo/README.md ("zoo README": each
release head in words, its config values and quirks) and golden/zoo/<method>_*.json (the cfg and
the source lines each golden file was built from); reference/clipspm_release.yaml (CLIP-SPM's
run/run.py params per dataset, which every model of that release reads). The data path of each
family (split lists, normalisation, tasks per step) is make_experiments.py's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Item = tuple[str, Any, str]  # (key, value, comment) of one line of a section
Left = list[tuple[str, str]]  # [(options left at fsar's defaults, comma-separated; why)]
Options = tuple[list[Item], Left]
SSV2 = ("ssv2_full", "ssv2_small")


@dataclass(frozen=True)
class Head:
    """One zoo head: `family` "clipfsar" (the CLIP-FSAR codebase's data path, preset
    clipfsar_release) or "clipspm" (the CLIP-SPM release's, preset clipspm_release);
    `options(dataset, shot, run_params)` -> (head items, [(options left at defaults, why)])."""

    title: str
    release: str
    family: str
    widths: str
    options: Callable[[str, int, dict], Options]
    prompts: str | None = None  # extract.prompts when the release's differ from the preset's
    amp: tuple[str, ...] = ()  # datasets whose release config turns on bf16 autocast (USE_AMP)
    spm_base: bool = True  # the reference YAML's base_defaults (CLIP-SPM's base.yaml) are its own


def _none(dataset: str, shot: int, params: dict) -> Options:
    return [], []


def _otam(dataset: str, shot: int, params: dict) -> Options:
    return [
        ("bidirectional", True, "both directions summed (zoo README, OTAM)"),
        ("lam", 0.1, "OTAM_cum_dist's soft-min temperature in CNN_OTAM (zoo README)"),
        ("prototype", False, "class distance = mean of its supports' distances (zoo README)"),
    ], []


def _crosstransformer(dataset: str, shot: int, params: dict) -> Options:
    return [
        ("hidden", 1024, "release hidden_dim (zoo README; crosstransformer_*.json patches)"),
        ("logit_divisor", 8.0, "the release's hard-coded / 8 (zoo README)"),
    ], []


def _trx(dataset: str, shot: int, params: dict) -> Options:
    return [
        ("temporal_set", [2, 3], "CNN_TRX.__init__ forces temp_set [2, 3] (zoo README)"),
        ("out_dim", 1152, "CNN_TRX.__init__ forces trans_linear_out_dim 1152 (zoo README)"),
        ("position_scale", 0.1, "position code scaled by 0.1 (zoo README; pe_scale_factor)"),
        ("max_len", None, "position table of int(1.5 * T) rows (zoo README)"),
        ("dropout", 0.1, "trans_dropout (trx_*.json cfg)"),
    ], []


def _hyrsm_common(dataset: str, shot: int) -> list[Item]:
    if shot == 1:
        members = ("set_members", "videos", "CNN_HyRSM_1shot: every support a set member")
    else:
        members = ("set_members", "prototypes", "CNN_HyRSM_5shot: class prototypes as members")
    return [
        members,
        ("mid_dim", None, "= D, the release's width (see the header)"),
        ("heads", 8, "8 heads in both attentions (zoo README)"),
    ]


POSITION_NOTE = (
    "position_a, position_b",
    "10 / 1, the values the class uses when a cfg has no POSITION_A/B (zoo README); no shared "
    "source gives a HyRSM config's values",
)
DROPOUT_NOTE = ("dropout", "on, fsar's default; no shared source states the release's rates")
FRAME_CLASS_NOTE = (
    "aux_weights.frame_class",
    "fsar's 0.6 is the SSv2 configs' USE_CLASSIFICATION_VALUE; the zoo README gives 0.4 or "
    "0.15 for the others without saying which dataset has which",
)


def _hyrsm(dataset: str, shot: int, params: dict) -> Options:
    items = _hyrsm_common(dataset, shot)
    if dataset in SSV2:
        weights = {"frame_class": 0.6}
        items.append(
            ("aux_weights", weights, "USE_CLASSIFICATION_VALUE, SSv2 configs (zoo README)")
        )
        return items, [POSITION_NOTE, DROPOUT_NOTE]
    return items, [POSITION_NOTE, DROPOUT_NOTE, FRAME_CLASS_NOTE]


def _hyrsm_pp(dataset: str, shot: int, params: dict) -> Options:
    items = _hyrsm_common(dataset, shot)
    if dataset not in SSV2:
        why = (
            "fsar's defaults are the SSv2 configs' values; the zoo README gives no others (the "
            "frame_class weight there is 0.4 or 0.15, it does not say which)"
        )
        keys = "position_a, position_b, window_size, temporal_balance, balance_coefficient, "
        return items, [(keys + "aux_weights", why), DROPOUT_NOTE]
    where = "SSv2 configs (zoo README; hyrsmpp_*.json cfg)"
    items += [
        ("position_a", 10.0, f"POSITION_A, {where}"),
        ("position_b", 1.0, "POSITION_B"),
        ("window_size", 1, "WINDOW_SIZE"),
        ("temporal_balance", 51.0, "TEMPORAL_BALANCE"),
        ("balance_coefficient", 10.0, "BALANCE_COEFFICIENT"),
        (
            "aux_weights",
            {"frame_class": 0.6, "temporal_regular": 0.3},
            "USE_CLASSIFICATION_VALUE, TEMPORAL_LOSS_WEIGHT",
        ),
    ]
    return items, [DROPOUT_NOTE]


# cpm2c's MOTION_COFF / NORMAL_COFF where the zoo README names the config (ssv2_otam.yaml: 1 / 1,
# as the cpm2c_*.json cfg; ucf.yaml: MOTION_COFF 0)
CPM2C_COFFS = {
    "ssv2_full": [
        ("normal_coff", 1.0, "ssv2_otam.yaml NORMAL_COFF (zoo README; cpm2c_*.json cfg)"),
        ("motion_coff", 1.0, "ssv2_otam.yaml MOTION_COFF"),
    ],
    "ucf101": [("motion_coff", 0.0, "ucf.yaml MOTION_COFF 0 (zoo README)")],
}
CPM2C_PARAMS = ("mid_dim_vision", "mid_dim_text", "negative_slope", "alpha")


def _cpm2c(dataset: str, shot: int, params: dict) -> Options:
    items: list[Item] = [
        ("heads", 8, "context2: 8 heads (zoo README)"),
        ("dim_head", None, "= D / 8, the release's dim_head_k (cpm2c_*.json patches)"),
        ("mlp_dim", 2048, "Transformer_v1's FFN width (zoo README)"),
        ("attn_dropout", 0.2, "dropout_atte=0.2 (cpm2c_*.json patches)"),
    ]
    key = params["key"]
    for name in CPM2C_PARAMS:
        items.append((name, params[name], f"run/run.py params, {key} (reference YAML)"))
    coffs = CPM2C_COFFS.get(dataset, [])
    items += coffs
    items += [
        (
            "local_weight",
            1.0,
            "lambdas1: LMD[1] of the configs (zoo README; the code never reads LMD)",
        ),
        ("global_weight", 0.0, "lambdas2 = LMD[2]"),
        (
            "aux_weights",
            {"classification": 0.5, "local": 1.0, "global": 0.0, "consistency": 0.001},
            "LMD and 0.001 * consistency (zoo README)",
        ),
    ]
    left = [
        ("ffn_dropout", "no shared source shows the release's FFN dropout"),
        (
            "motion_residual_ratio",
            "the release's run.py lacks the key (zoo README); fsar's 0.5 is the golden files' "
            "choice",
        ),
    ]
    written = {name for name, _, _ in coffs}
    missing = [name for name in ("normal_coff", "motion_coff") if name not in written]
    if missing:
        left.append(
            (
                ", ".join(missing),
                f"1, fsar's; the zoo README names the values of ssv2_otam.yaml and ucf.yaml only "
                f"(this is {key})",
            )
        )
    return items, left


def _clipmei(dataset: str, shot: int, params: dict) -> Options:
    return [
        ("heads", 8, "context1/context2: 8 heads (zoo README; clipmei_*.json patches)"),
        ("dim_head", 256, "the release's hard-coded dim_head_k=256 (same source)"),
        ("mlp_dim", 2048, "Transformer_v1's FFN width (zoo README)"),
        ("prompt_hidden", 2048, "token_tr FeedForward(dim, 2048) (zoo README; same patches)"),
        ("attn_dropout", 0.2, "dropout_atte=0.2 (clipmei_*.json patches)"),
        ("ffn_dropout", 0.05, "token_tr FeedForward dropout=0.05 (clipmei_*.json patches)"),
        ("fusion_weight", 0.1, "se(x, u) = context2([u ; x + 0.1 u]) (zoo README)"),
        ("class_distance_weight", 0.5, "logits = -(0.5 class_dists_l + task) (zoo README)"),
        ("otam_lambda", 0.5, "OTAM_cum_dist_v2's temperature (zoo README)"),
        (
            "aux_weights",
            {"consistency": 0.001, "text_distance": 0.001, "motion_consistency": 0.001},
            "loss = CE + 0.001 * dists (zoo README)",
        ),
    ], []


ALIBABA_D = "2048 for an ImageNet ResNet-50"
HEADS: dict[str, Head] = {
    "otam": Head(
        "OTAM",
        "CLIP-FSAR codebase, CNN_OTAM",
        "clipfsar",
        "no parameters: any D.",
        _otam,
    ),
    "tsn": Head("TSN", "CLIP-FSAR codebase, CNN_TSN", "clipfsar", "no parameters: any D.", _none),
    "crosstransformer": Head(
        "CrossTransformer",
        "CLIP-FSAR codebase, CNN_CrossTransformer",
        "clipfsar",
        f"the key/value heads read D (RN50 1024, ViT-B/16 512; the release hard-codes "
        f"{ALIBABA_D}); hidden 1024 for both.",
        _crosstransformer,
    ),
    "trx": Head(
        "TRX",
        "CLIP-FSAR codebase, CNN_TRX",
        "clipfsar",
        "a k-tuple's linears read k * D (RN50 1024, ViT-B/16 512; the release ties its in-dim "
        "to the backbone name: 2048 for resnet50, else 512, so a CLIP RN50 feature does not fit "
        "it); out_dim 1152 for both.",
        _trx,
    ),
    "hyrsm": Head(
        "HyRSM",
        "CLIP-FSAR codebase, CNN_HyRSM_1shot / CNN_HyRSM_5shot",
        "clipfsar",
        "mid_dim null = D: 1024 on RN50, 512 on ViT-B/16 (the release: 2048 for resnet50, "
        "else 512; RN50's 1024 only fits null), 8 heads of D / 8.",
        _hyrsm,
    ),
    "hyrsm_pp": Head(
        "HyRSM++",
        "CLIP-FSAR codebase, CNN_HyRSM_plusplus_1shot / _5shot",
        "clipfsar",
        "mid_dim null = D: 1024 on RN50, 512 on ViT-B/16 (the release: 2048 for resnet50, "
        "else 512; RN50's 1024 only fits null), 8 heads of D / 8.",
        _hyrsm_pp,
    ),
    "sten": Head(
        "STEN",
        "CLIP-SPM release, models/model_sten.py",
        "clipspm",
        "no parameters: any D (the release's width is tied to the backbone: RN50 1024, "
        "ViT-B/16 512).",
        _none,
        prompts="single",
    ),
    "cpm2c": Head(
        "CLIP-CPM2C",
        "CLIP-SPM release, models/model_cpm2c.py",
        "clipspm",
        "the release's width is D (RN50 1024, ViT-B/16 512); dim_head null = D / 8 (128 / 64); "
        "the gates' widths are mid_dim_* x D.",
        _cpm2c,
    ),
    "clipmei": Head(
        "CLIP-MEI",
        "D-XH/CLIP-MEI, models/model_clipmei.py",
        "clipspm",
        "the release's width is D (RN50 1024, ViT-B/16 512); dim_head 256 and the FFN widths "
        "2048 for both.",
        _clipmei,
        prompts="single",
        amp=("ssv2_full",),
        spm_base=False,
    ),
}


def zoo_options(reference: dict, method: str, dataset: str, shot: int, release_key: str) -> Options:
    """A zoo head's (option lines, [(options left at fsar's defaults, why)]) for a dataset;
    `release_key` names the dataset in the reference YAML (hmdb, ucf, k100, ssv2_cmn, ...)."""
    params = {"key": release_key, **reference["head_hyperparameters_by_dataset"][release_key]}
    return HEADS[method].options(dataset, shot, params)


def zoo_notes(
    reference: dict,
    method: str,
    dataset: str,
    shot: int,
    release_key: str,
    clipfsar_source: tuple[str, str] | None,
) -> list[str]:
    """The header paragraphs of a zoo file: sources, what is left at fsar's defaults and why,
    the widths per backbone. `clipfsar_source`: (release config file, clipfsar_train.json key) of
    the CLIP-FSAR config whose data path a clipfsar-family file follows."""
    spec = HEADS[method]
    paragraphs = [
        "Generated by configs/make_experiments.py with configs/zoo_experiments.py; edit them, not "
        "this file. Head values: the golden zoo README and <method>_*.json of the shared folder "
        "(each line names its source)."
    ]
    schedule = "train.lr, train.weight_decay, train.seed, train.steps, train.val_every"
    if clipfsar_source is not None:
        config_file, config_key = clipfsar_source
        follows = " (the release ships no 3-shot config: its 1-shot one)" if shot == 3 else ""
        paragraphs += [
            f"Data path: the CLIP-FSAR codebase's, as its config {config_file}{follows} resolves "
            f"it (golden data_path/clipfsar_train.json per_config.{config_key}: split lists, "
            "normalisation), 4 tasks per step; the preset sets the frame and pixel rules and "
            "protocol.train_query 5 (its QUERY_PER_CLASS).",
            f"Not derived, at fsar's defaults: {schedule}, eval.episodes (no shared source gives "
            "this head's solver or schedule; set steps / val_every for a run); protocol.train_shot "
            "null, K-shot training: the preset's 1-shot training goes with CLIP-FSAR's "
            "merge-before, and no shared source gives this head's training shot.",
        ]
    else:
        if spec.spm_base:
            origin = (
                "the CLIP-SPM release's (the preset, its split lists, and TASKS_PER_BATCH / test "
                "episodes of its configs/base.yaml from the reference YAML's base_defaults)"
            )
        else:
            origin = (
                "CLIP-SPM's (the preset and its split lists): CLIP-MEI derives from the same code "
                "and the shared sources give no data path of its own; TASKS_PER_BATCH 16 of its "
                "configs/base.yaml (zoo README)"
            )
        defaults = schedule if spec.spm_base else f"{schedule}, eval.episodes"
        if spec.amp and dataset not in spec.amp:
            defaults += ", train.bf16 (the zoo README names USE_AMP in ssv2_otam.yaml only)"
        paragraphs += [
            f"Data path and loop: {origin}.",
            f"Not derived, at fsar's defaults: {defaults}. The reference YAML's per-dataset solver "
            "and schedule are the CLIP-SPM head's configs (configs/clipspm/*.yaml); this head's "
            "own configs are not in the shared folder.",
        ]
    _, left = zoo_options(reference, method, dataset, shot, release_key)
    for names, why in left:
        named = ", ".join(f"head.{name.strip()}" for name in names.split(","))
        paragraphs.append(f"{named}: {why}.")
    paragraphs.append(f"Widths (RN50 D=1024, ViT-B/16 D=512): {spec.widths}")
    return paragraphs
