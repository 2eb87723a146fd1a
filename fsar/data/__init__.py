"""Data sources, frame policies, transforms and the synthetic demo dataset.

Split parsing and datasets live in sibling modules of this package.
"""

from fsar.data.frames import (
    POLICY_KINDS,
    FramePolicy,
    ShortVideoError,
    parse_frame_policy,
    select_frames,
    train_frame_positions,
)
from fsar.data.synthetic import (
    DemoInfo,
    DemoPair,
    DemoSpec,
    demo_pairs,
    render_clip,
    render_demo_dataset,
    write_frame_folder,
    write_video,
)
from fsar.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    Preprocess,
    apply_view,
    parse_views,
    view_seed,
)
from fsar.data.video import DecodeError, FrameSource, open_source

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "POLICY_KINDS",
    "DecodeError",
    "DemoInfo",
    "DemoPair",
    "DemoSpec",
    "FramePolicy",
    "FrameSource",
    "Preprocess",
    "ShortVideoError",
    "apply_view",
    "demo_pairs",
    "open_source",
    "parse_frame_policy",
    "parse_views",
    "render_clip",
    "render_demo_dataset",
    "select_frames",
    "train_frame_positions",
    "view_seed",
    "write_frame_folder",
    "write_video",
]
