"""augment.py: random augmentations of whole batches, on the training device.

One call draws, for every image of a batch, a flip, a rotation, a scaling, a translation and a
smooth elastic displacement field, folds them into one sampling grid and resamples the batch once
with grid_sample; labels, when given, follow the same grid with nearest-neighbour sampling. Then
intensities get a random gain, offset and Gaussian noise (images only). Nothing here loops over
images, so a batch costs a few tensor operations on the CPU or the GPU.

The paper (authors' code): random flips, then with p = 0.67 rotation by any angle, scaling in
[0.7, 1.3] and elastic deformation; no intensity changes. PRETRAIN follows it and adds a small
translation and mild intensity changes; FINETUNE is gentler and never flips (flipping would swap
the anatomy's left and right, which the labels tell apart).
"""
import math
from dataclasses import dataclass, asdict

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    flip: float = 0.5             # probability of each of the two in-plane flips
    spatial: float = 0.67         # probability of the random affine warp (+ elastic), per image
    rotate: float = 180.0         # rotation angle drawn uniformly in [-rotate, rotate] degrees
    scale: tuple = (0.7, 1.3)     # zoom factor drawn uniformly in this range
    translate: float = 0.1        # shift drawn uniformly in [-translate, translate] x image size
    elastic: float = 0.67         # probability of elastic deformation, among warped images
    elastic_alpha: float = 0.06   # displacement of the random field, x image size (at most)
    elastic_grid: int = 4         # the field is smooth: drawn on a grid x grid lattice, upsampled
    intensity: float = 0.8        # probability of a random gain in [0.8, 1.2] and offset in [-0.2, 0.2]
    noise: float = 0.3            # probability of Gaussian noise with std drawn in [0, noise_std]
    noise_std: float = 0.1

    def as_dict(self):
        return asdict(self)


PRETRAIN = Augment()
FINETUNE = Augment(flip=0.0, spatial=0.8, rotate=15.0, scale=(0.85, 1.15), translate=0.05,
                   elastic=0.5, elastic_alpha=0.03, intensity=0.5, noise=0.2, noise_std=0.05)


def augment(images, config, generator, labels=None):
    """images (B, 1, H, W) float, labels (B, H, W) int or None -> augmented copies.

    `generator` is a torch.Generator on the images' device: the same generator state gives the
    same augmentations, which is what makes a resumed run equal an uninterrupted one."""
    B, _, H, W = images.shape
    device = images.device

    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(shape or (B,), generator=generator, device=device)

    def happens(p):
        return torch.rand(B, generator=generator, device=device) < p  # (B,) bool

    # 1. one affine map per image, in grid_sample's normalized coordinates [-1, 1]
    warp = happens(config.spatial)
    angle = torch.where(warp, uniform(-config.rotate, config.rotate), 0.0) * math.pi / 180  # (B,)
    zoom = torch.where(warp, uniform(*config.scale), 1.0)  # (B,)
    shift = torch.where(warp[:, None], uniform(-config.translate, config.translate, B, 2) * 2, 0.0)  # (B, 2)
    flip_x = torch.where(happens(config.flip), -1.0, 1.0)  # (B,)
    flip_y = torch.where(happens(config.flip), -1.0, 1.0)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom  # zooming in = sampling a smaller area
    theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], 1),
                         torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)  # (B, H, W, 2)

    # 2. a smooth random displacement field, for the warped images drawn to be elastic
    elastic = warp & happens(config.elastic)  # (B,)
    g = config.elastic_grid
    field = uniform(-1.0, 1.0, B, 2, g, g) * 2 * config.elastic_alpha * elastic[:, None, None, None]
    field = F.interpolate(field, size=(H, W), mode="bicubic", align_corners=True)  # (B, 2, H, W)
    grid = grid + field.permute(0, 2, 3, 1)  # (B, H, W, 2)

    images = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border",
                           align_corners=False)  # (B, 1, H, W)
    if labels is not None:
        labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                               align_corners=False)[:, 0].long()  # (B, H, W)

    # 3. intensities: gain and offset, then noise
    change = happens(config.intensity)[:, None, None, None]  # (B, 1, 1, 1)
    gain = torch.where(change, uniform(0.8, 1.2, B, 1, 1, 1), 1.0)
    offset = torch.where(change, uniform(-0.2, 0.2, B, 1, 1, 1), 0.0)
    std = uniform(0.0, config.noise_std, B, 1, 1, 1) * happens(config.noise)[:, None, None, None]
    noise = torch.randn(images.shape, generator=generator, device=device, dtype=images.dtype)
    images = images * gain + offset + noise * std
    return images if labels is None else (images, labels)


def epoch_generator(device, seed, epoch, rank=0):
    """The augmentations' random numbers for one epoch of one process, a function of
    (seed, epoch, rank) alone: resuming at any epoch replays exactly the same draws."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
