"""Class-name prompts and their text embeddings."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fsar.config import ConfigError

# The 16-template ensemble of the CLIP-SPM release (its text features are the mean of
# encode_text over these templates).
CLIPSPM_TEMPLATES = (
    "a photo of action {}",
    "a picture of action {}",
    "Human action of {}",
    "{}, an action",
    "{} this is an action",
    "{}, a video of action",
    "Playing action of {}",
    "{}",
    "Playing a kind of action, {}",
    "Doing a kind of action, {}",
    "Look, the human is {}",
    "Can you recognize the action of {}?",
    "Video classification of {}",
    "A video of {}",
    "The man is {}",
    "The woman is {}",
)
# CLIP-FSAR prompts every class with one template.
SINGLE_TEMPLATE = ("a photo of {}",)


def resolve_templates(spec: str) -> tuple[str, ...]:
    """``clipspm16`` | ``single`` | a custom template containing ``{}``."""
    if spec == "clipspm16":
        return CLIPSPM_TEMPLATES
    if spec == "single":
        return SINGLE_TEMPLATE
    if "{}" in spec:
        return (spec,)
    raise ConfigError(
        f"extract.prompts={spec!r}: use clipspm16, single, or a template containing {{}} "
        f"(e.g. 'a video of {{}}')"
    )


@torch.no_grad()
def encode_class_names(
    model: torch.nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch: int = 256,
) -> torch.Tensor:
    """Text embeddings [C, P, D] (not normalised) of every class under every template."""
    device = next(model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]
    chunks = []
    for start in range(0, len(prompts), batch):
        tokens = tokenizer(prompts[start : start + batch]).to(device)
        chunks.append(model.encode_text(tokens).float().cpu())
    return torch.cat(chunks).reshape(len(class_names), len(templates), -1)
