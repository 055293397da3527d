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

The two other pretext tasks make their inputs here too, also without a loop over images:
rotate_batch turns each slice by k * 90 degrees (Rotation; its views use UPRIGHT, which neither
flips nor turns by more than 15 degrees, else k could not be told), and jigsaw cuts a slice into
3 x 3 tiles and shuffles them (PIRL; see cut_tiles for the tile sizes in 2D).
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
# No flips and small angles: the anatomy stays upright and left stays left. Rotation's pretext task
# needs it (two flips equal a 180-degree turn); `pretrain.py --augment upright` uses it for any method.
UPRIGHT = Augment(flip=0.0, rotate=15.0)
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


def rotate_batch(images, generator):
    """Rotation's input: images (B, C, S, S) each turned counter-clockwise by k * 90 degrees, k drawn
    uniformly in {0, 1, 2, 3} per image. Returns (rotated (B, C, S, S), k (B,) long): the labels."""
    B, _, H, W = images.shape
    if H != W:
        raise ValueError(f"rotations by 90 degrees need square slices, got {H} x {W}")
    k = torch.randint(0, 4, (B,), generator=generator, device=images.device)  # (B,)
    turned = torch.stack([images.rot90(r, dims=(2, 3)) for r in range(4)])  # (4, B, C, S, S)
    return turned[k, torch.arange(B, device=images.device)], k


def cut_tiles(images, generator, grid=3):
    """PIRL's jigsaw tiles in row-major grid order: (B, C, S, S) -> (B, T, C, t, t), T = grid**2.

    PIRL cuts 64-px tiles from the 85-px cells of a 255-px crop, at a random offset in each cell.
    A 2D slice is small and the encoder needs sides divisible by 16, so here a tile has
    t = 16 * max(1, S // 64) px (16 for S = 64) and covers a quarter of the slice's side as in PIRL:
    the slice is resampled to 4t px when S != 4t (S = 32, 96: bilinear), cut into cells of
    floor(4t / grid) px (21 for t = 16) placed at a random origin, and each tile lies at a random
    whole-pixel jitter inside its cell. Tiles are plain pixel copies (gathered with index tensors)."""
    B, C, H, W = images.shape
    if H != W:
        raise ValueError(f"jigsaw tiles need square slices, got {H} x {W}")
    t = 16 * max(1, H // 64)
    side, device = 4 * t, images.device
    cell = side // grid
    if cell < t:
        raise ValueError(f"a {grid} x {grid} grid of {t}-px tiles does not fit in {side} px; use grid <= 4")
    if H != side:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False,
                               antialias=H > side)  # (B, C, 4t, 4t)
    T = grid * grid
    origin = torch.randint(0, side - grid * cell + 1, (B, 1, 2), generator=generator, device=device)
    steps = torch.arange(grid, device=device) * cell  # (grid,)
    cells = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), -1).reshape(T, 2)  # (T, 2): (row, col)
    jitter = torch.randint(0, cell - t + 1, (B, T, 2), generator=generator, device=device)  # (B, T, 2)
    corner = origin + cells + jitter  # (B, T, 2): top-left pixel of every tile
    rows = corner[..., 0, None] + torch.arange(t, device=device)  # (B, T, t)
    cols = corner[..., 1, None] + torch.arange(t, device=device)  # (B, T, t)
    b = torch.arange(B, device=device)[:, None, None, None]  # (B, 1, 1, 1)
    tiles = images.permute(0, 2, 3, 1)[b, rows[..., :, None], cols[..., None, :]]  # (B, T, t, t, C)
    return tiles.permute(0, 1, 4, 2, 3)  # (B, T, C, t, t)


def jigsaw(images, generator, grid=3):
    """PIRL's jigsaw transform: the tiles of cut_tiles shuffled by one permutation per image, drawn
    uniformly from all T! (9! = 362880) as PIRL does (no fixed subset: PIRL never classifies them).
    Returns (shuffled (B, T, C, t, t), perm (B, T)) with shuffled[b, k] = tiles[b, perm[b, k]]."""
    tiles = cut_tiles(images, generator, grid)  # (B, T, C, t, t)
    B, T = tiles.shape[:2]
    perm = torch.argsort(torch.rand(B, T, generator=generator, device=images.device), dim=1)  # (B, T)
    return tiles[torch.arange(B, device=images.device)[:, None], perm], perm  # (B, T, C, t, t), (B, T)
