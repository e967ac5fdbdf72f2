"""DEKR pre- and post-processing as the seed's Ascend pipeline runs it (spec §d and §e).

Preprocessing: resize the short side to 512 onto one of five fixed canvases (buckets), centred;
normalise; build the flipped input. Postprocessing (single scale, flip test): fuse the plain and
flipped outputs, take person-centre candidates, read one pose per centre from the offsets, score
joints on the upsampled heatmap, suppress duplicates with a keypoint-distance NMS, map back to image
coordinates, rescore with the rescoring MLP and emit COCO result entries.

The affine geometry, warp and normalisation come from the shared ``tooling.coco.transforms``
(DEKR uses its classic ``size_minus_one=False`` pixel convention); image reading, annotation
loading and COCOeval are in ``tooling.coco`` as well.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tooling.coco.dataset import read_image_rgb
from tooling.coco.keypoints import PERSON_CATEGORY_ID
from tooling.coco.transforms import PIXEL_STD, affine_transform_points, get_affine_transform, normalize_rgb, warp_crop
from tooling.models.dekr.network import NUM_JOINTS, OUTPUT_STRIDE

INPUT_SIZE = 512
BUCKET_SIZES = (512, 768, 1024)
SIZE_GRANULARITY = 64
FLIP_SHIFT = 3  # columns; makes the input mirror line up with the output-grid flip (spec §d.6)

FLIP_INDEX = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
FLIP_INDEX_WITH_CENTER = (*FLIP_INDEX, NUM_JOINTS)
MAX_PEOPLE = 30
CENTER_THRESHOLD = 0.01
NMS_DISTANCE_RATIO = 0.05
NMS_MIN_CLOSE_JOINTS = 8
CENTER_POOL_KERNEL = 3  # 5 or 7 only for maps with (h+w)/2 > 200, which no bucket reaches
RESCORE_LINKS = (
    (0, 0, 1, 1, 2, 3, 4, 5, 5, 5, 6, 6, 7, 8, 11, 11, 12, 13, 14),
    (1, 2, 2, 3, 4, 5, 6, 6, 7, 11, 8, 12, 9, 10, 12, 13, 14, 15, 16),
)
RESCORE_NORM_LINKS = (9, 11)  # shoulder-to-hip links: the torso length normalises the features


# --- preprocessing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputGeometry:
    """Where an image of ``image_wh`` lands on its ``bucket_wh`` network canvas.

    ``center`` (integer pixel) and ``scale`` (units of 200 px; only ``scale[0]`` sets the zoom,
    512 / short side) define the affine transform.
    """

    image_wh: tuple[int, int]
    bucket_wh: tuple[int, int]
    center: tuple[float, float]
    scale: tuple[float, float]


def bucket_length(length: int) -> int:
    """The Ascend helper's bucket: exact member, clamp to the ends, otherwise the next larger one."""
    if length <= BUCKET_SIZES[0]:
        return BUCKET_SIZES[0]
    return next((size for size in BUCKET_SIZES if size >= length), BUCKET_SIZES[-1])


def unbucketed_long_side(short_side: int, long_side: int) -> int:
    """Upstream canvas length of the long side: short side scaled to 512, rounded up to 64."""
    return int((INPUT_SIZE / short_side * long_side + SIZE_GRANULARITY - 1) // SIZE_GRANULARITY * SIZE_GRANULARITY)


def plan_input(width: int, height: int) -> InputGeometry:
    """Bucket, centre and scale for a width x height image (the short side always maps to 512)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    center = (float(int(width / 2 + 0.5)), float(int(height / 2 + 0.5)))
    if width < height:
        bucket_w, bucket_h = INPUT_SIZE, bucket_length(unbucketed_long_side(width, height))
        scale = (width / PIXEL_STD, bucket_h / bucket_w * width / PIXEL_STD)
    else:
        bucket_w, bucket_h = bucket_length(unbucketed_long_side(height, width)), INPUT_SIZE
        scale = (bucket_w / bucket_h * height / PIXEL_STD, height / PIXEL_STD)
    return InputGeometry((width, height), (bucket_w, bucket_h), center, scale)


def affine_matrix(geometry: InputGeometry, inverse: bool = False) -> np.ndarray:
    """2x3 float64 image -> canvas similarity (canvas -> image when ``inverse``)."""
    return get_affine_transform(
        geometry.center, geometry.scale, geometry.bucket_wh, size_minus_one=False, inverse=inverse
    )


def warp_to_canvas(image_rgb: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """Bilinear warp onto the bucket canvas, black outside the image."""
    return warp_crop(image_rgb, affine_matrix(geometry), geometry.bucket_wh)


def normalise(canvas_rgb: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 1x3xHxW, ToTensor then per-channel mean/std normalisation."""
    return torch.from_numpy(normalize_rgb(canvas_rgb)).unsqueeze(0)


def flipped_input(image: torch.Tensor) -> torch.Tensor:
    """Mirror along width, then shift left by 3 columns; the last 3 columns keep mirrored values."""
    flipped = torch.flip(image, dims=[-1])
    # Read from a copy: the overlapping in-place slice assignment upstream uses is an error in torch 2.x.
    flipped[..., :-FLIP_SHIFT] = flipped[..., FLIP_SHIFT:].clone()
    return flipped


@dataclass(frozen=True)
class NetworkInputs:
    image: torch.Tensor
    flipped: torch.Tensor
    geometry: InputGeometry


def preprocess(image_rgb: np.ndarray) -> NetworkInputs:
    """uint8 HxWx3 RGB image -> both network inputs (1x3xH_bxW_b) and the geometry to undo later."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image_rgb.dtype} {image_rgb.shape}")
    height, width = image_rgb.shape[:2]
    geometry = plan_input(width, height)
    image = normalise(warp_to_canvas(image_rgb, geometry))
    return NetworkInputs(image, flipped_input(image), geometry)


def preprocess_file(path: str | Path) -> NetworkInputs:
    """Reads with OpenCV (EXIF orientation ignored, as the seed does), then ``preprocess``."""
    return preprocess(read_image_rgb(path))


# --- postprocessing: network outputs -> poses on the canvas ----------------------------------------

def _single_image(name: str, tensor: torch.Tensor | np.ndarray, channels: int) -> torch.Tensor:
    tensor = torch.as_tensor(tensor, dtype=torch.float32)
    if tensor.dim() != 4 or tensor.shape[0] != 1 or tensor.shape[1] != channels:
        raise ValueError(f"{name}: expected shape (1, {channels}, h, w), got {tuple(tensor.shape)}")
    return tensor[0]


def offsets_to_pose_map(offset: torch.Tensor) -> torch.Tensor:
    """(34, h, w) offsets -> (17, 2, h, w) joint positions (x, y) in output-grid pixels."""
    height, width = offset.shape[-2:]
    cols = torch.arange(width, dtype=offset.dtype).view(1, width).expand(height, width)
    rows = torch.arange(height, dtype=offset.dtype).view(height, 1).expand(height, width)
    return torch.stack([cols, rows]).unsqueeze(0) - offset.view(NUM_JOINTS, 2, height, width)


def fuse_flip(
    heatmap: torch.Tensor, offset: torch.Tensor, heatmap_flip: torch.Tensor, offset_flip: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average the plain and the mirrored flipped outputs -> (heatmap (18,h,w), pose map (17,2,h,w))."""
    width = offset.shape[-1]
    poses_flip = offsets_to_pose_map(offset_flip)[list(FLIP_INDEX)]
    poses_flip = torch.stack([width - poses_flip[:, 0] - 1, poses_flip[:, 1]], dim=1)
    poses = (offsets_to_pose_map(offset) + torch.flip(poses_flip, dims=[-1])) / 2
    fused_heatmap = (heatmap + torch.flip(heatmap_flip, dims=[-1])[list(FLIP_INDEX_WITH_CENTER)]) / 2
    return fused_heatmap, poses


def center_candidates(
    center_map: torch.Tensor, max_people: int = MAX_PEOPLE, threshold: float = CENTER_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor]:
    """Local maxima of the (h, w) centre map -> (row-major flat indices, scores), best first.

    Equal-valued maxima (plateaus) all survive the pooling. Where upstream's topk leaves the order
    of equal scores unspecified, a stable sort makes it ascending flat index.
    """
    pooled = F.max_pool2d(center_map[None, None], CENTER_POOL_KERNEL, 1, CENTER_POOL_KERNEL // 2)[0, 0]
    peaks = torch.where(pooled == center_map, center_map, torch.zeros_like(center_map)).flatten()
    scores, indices = torch.sort(peaks, descending=True, stable=True)
    scores, indices = scores[:max_people], indices[:max_people]
    kept = scores > threshold
    return indices[kept], scores[kept]


def candidate_poses(pose_map: torch.Tensor, indices: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(P, 17, 3): joints (x, y) in canvas pixels read at each centre, centre score in column 2."""
    joints_xy = pose_map.flatten(2)[:, :, indices].permute(2, 0, 1) * OUTPUT_STRIDE
    return torch.cat([joints_xy, scores.view(-1, 1, 1).expand(-1, NUM_JOINTS, 1)], dim=2)


def full_resolution_heatmap(heatmap: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (C, 4h, 4w): align-corners bilinear to 4h-3 x 4w-3, edge-replicated by 3."""
    height, width = heatmap.shape[-2:]
    pad = OUTPUT_STRIDE - 1
    size = (OUTPUT_STRIDE * height - pad, OUTPUT_STRIDE * width - pad)
    upsampled = F.interpolate(heatmap[None], size=size, mode="bilinear", align_corners=True)
    return F.pad(upsampled, (0, pad, 0, pad), mode="replicate")[0]


def joint_heat_values(full_heatmap: torch.Tensor, poses: torch.Tensor) -> torch.Tensor:
    """(P, 17) heatmap value of each joint at its (floored, clamped) canvas pixel."""
    height, width = full_heatmap.shape[-2:]
    cols = poses[..., 0].floor().long().clamp(0, width - 1)
    rows = poses[..., 1].floor().long().clamp(0, height - 1)
    joints = torch.arange(NUM_JOINTS).expand_as(cols)
    return full_heatmap[joints, rows, cols]


def pose_nms(joints_xy: torch.Tensor, heat_scores: torch.Tensor) -> list[int]:
    """Greedy keypoint-distance NMS over (P, 17, 2) poses given in candidate order.

    Pose i suppresses pose k when more than 8 joints lie within 5 % of i's bounding-box diagonal.
    Each group keeps its member with the best mean heat value (first on ties). A pose always
    belongs to its own group: this equals upstream whenever the pose has extent, and gives a
    pose with coinciding joints (zero diagonal, where upstream's argmax crashes on an empty group)
    a group of its own. At most ``MAX_PEOPLE`` candidates come in, so upstream's cap on the number
    of kept poses never applies.
    """
    extent = joints_xy.amax(dim=1) - joints_xy.amin(dim=1)
    radius = NMS_DISTANCE_RATIO * (extent**2).sum(dim=-1).sqrt()
    distance = (joints_xy[:, None] - joints_xy[None, :]).pow(2).sum(dim=-1).sqrt()  # (P, P, 17)
    suppresses = (distance < radius.view(-1, 1, 1)).sum(dim=-1) > NMS_MIN_CLOSE_JOINTS
    suppresses.fill_diagonal_(True)

    ignored = torch.zeros(len(joints_xy), dtype=torch.bool)
    keep: list[int] = []
    for candidate in range(len(joints_xy)):
        if ignored[candidate]:
            continue
        group = suppresses[candidate].nonzero().flatten()
        best = int(group[heat_scores[group].argmax()])
        if ignored[best]:
            continue
        keep.append(best)
        ignored[group] = True
    return keep


@dataclass(frozen=True)
class CanvasPoses:
    """Decoded poses on the bucket canvas plus the intermediates the goldens tabulate."""

    candidate_index: torch.Tensor  # (P,) flat row-major index into the h x w output grid
    candidate_score: torch.Tensor  # (P,)
    poses_pre_nms: torch.Tensor  # (P, 17, 3), column 2 = centre score
    heat_values_pre_nms: torch.Tensor  # (P, 17)
    keep: list[int]  # candidate indices kept by the NMS, in selection order
    poses: torch.Tensor  # (K, 17, 3), column 2 = centre score x heat value
    scores: torch.Tensor  # (K,) mean of column 2


def decode_poses(
    heatmap: torch.Tensor | np.ndarray,
    offset: torch.Tensor | np.ndarray,
    heatmap_flip: torch.Tensor | np.ndarray,
    offset_flip: torch.Tensor | np.ndarray,
) -> CanvasPoses:
    """Network outputs (each N=1, NCHW) of the plain and the flipped input -> poses on the canvas."""
    channels = 2 * NUM_JOINTS
    fused_heatmap, pose_map = fuse_flip(
        _single_image("heatmap", heatmap, NUM_JOINTS + 1), _single_image("offset", offset, channels),
        _single_image("heatmap_flip", heatmap_flip, NUM_JOINTS + 1),
        _single_image("offset_flip", offset_flip, channels),
    )
    indices, center_scores = center_candidates(fused_heatmap[NUM_JOINTS])
    poses = candidate_poses(pose_map, indices, center_scores)
    heat_values = joint_heat_values(full_resolution_heatmap(fused_heatmap[:NUM_JOINTS]), poses)
    keep = pose_nms(poses[..., :2], heat_values.mean(dim=1))
    kept = poses[keep]
    joint_scores = kept[..., 2] * heat_values[keep]
    kept = torch.cat([kept[..., :2], joint_scores.unsqueeze(-1)], dim=-1)
    return CanvasPoses(indices, center_scores, poses, heat_values, keep, kept, joint_scores.mean(dim=1))


# --- postprocessing: canvas poses -> scored COCO detections ----------------------------------------

def to_image_coordinates(poses: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
    """(K, 17, 3) canvas poses -> image pixels (columns 0-1, no half-pixel shift); column 2 kept."""
    xy = affine_transform_points(poses[..., :2].numpy(), affine_matrix(geometry, inverse=True))
    return torch.cat([torch.from_numpy(xy).float(), poses[..., 2:]], dim=-1)


def rescore_features(poses: torch.Tensor) -> torch.Tensor:
    """(K, 17, 3) image-space poses -> (K, 74): limb vectors and lengths / torso length, joint scores."""
    start, end = RESCORE_LINKS
    limbs = poses[:, list(start), :2] - poses[:, list(end), :2]  # (K, 19, 2)
    lengths = limbs.pow(2).sum(dim=-1).sqrt()
    norm = (lengths[:, RESCORE_NORM_LINKS[0]] + lengths[:, RESCORE_NORM_LINKS[1]]) / 2
    norm = torch.where(norm < 1, torch.ones_like(norm), norm).unsqueeze(1)
    return torch.cat([limbs.flatten(1) / norm, lengths / norm, poses[..., 2]], dim=1)


@torch.no_grad()
def rescore(poses: torch.Tensor, scores: torch.Tensor, rescore_net: torch.nn.Module) -> torch.Tensor:
    """Final detection scores: rescoring-net output (NaN read as 0) times the pose score."""
    predicted = rescore_net(rescore_features(poses))[:, 0]
    return torch.where(predicted.isnan(), torch.zeros_like(predicted), predicted) * scores


def image_id_from_file_name(file_name: str) -> int:
    """COCO image id from a file name ending in the 12-digit id and a 4-char extension."""
    digits = file_name[-16:-4]
    if not digits.isdigit():
        raise ValueError(f"expected a file name like 000000397133.jpg, got {file_name!r}")
    return int(digits)


def coco_results(poses: torch.Tensor, scores: torch.Tensor, image_id: int) -> list[dict[str, Any]]:
    """One COCO keypoint result per pose; the third keypoint value is the joint score, not visibility."""
    results = []
    for pose, score in zip(poses.double().numpy(), scores.double().numpy()):
        x, y = pose[:, 0], pose[:, 1]
        results.append({
            "image_id": image_id,
            "category_id": PERSON_CATEGORY_ID,
            "keypoints": pose.reshape(-1).tolist(),
            "score": float(score),
            "bbox": [float(x.min()), float(y.min()), float(x.max() - x.min()), float(y.max() - y.min())],
        })
    return results


@dataclass(frozen=True)
class ImagePoses:
    poses: torch.Tensor  # (K, 17, 3) in image pixels, column 2 = joint score
    pose_scores: torch.Tensor  # (K,) before rescoring
    scores: torch.Tensor  # (K,) final, after rescoring


def postprocess(
    outputs: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    flipped_outputs: tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray],
    geometry: InputGeometry,
    rescore_net: torch.nn.Module,
) -> ImagePoses:
    """(heatmap, offset) of the plain and the flipped input -> rescored poses in image pixels."""
    canvas = decode_poses(*outputs, *flipped_outputs)
    poses = to_image_coordinates(canvas.poses, geometry)
    return ImagePoses(poses, canvas.scores, rescore(poses, canvas.scores, rescore_net))
