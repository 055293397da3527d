"""augment.py: random augmentations of whole batches, on the training device.

One call draws, for every image of a batch, two flips, a rotation, a scaling, a translation and an
elastic displacement field, folds them into one sampling grid and resamples the batch once with
grid_sample; labels, when given, follow the same grid with nearest-neighbour sampling. Then
intensities get a random gain, offset and Gaussian noise (images only). Nothing loops over images.

The named configurations (`--augment NAME` in pretrain.py and finetune.py):
  paper    the authors' (batchgenerators 0.23): flips with p = 0.5 per axis, then with p = 0.67
           their elastic field (below), rotation by any angle and scaling in [0.7, 1.3], in that
           order (the field turns and zooms with the slice); cubic interpolation, zero padding, no
           intensity change;
  upright  this project's pretraining default on the synthetic data: no flips, rotations within 15
           degrees, a smooth lattice elastic field, mild intensity changes (slices are already
           oriented alike from their affines; README);
  gentle   this project's finetuning default: upright's turns (within 15 degrees), warped more often
           (p = 0.8), with smaller scaling, shifts, elastic field, intensity changes and noise;
  none     no augmentation (the authors' finetuning on CHD and MMWHS).

The authors' elastic field, per axis: gaussian_filter(U(-1, 1) noise, sigma) * alpha pixels, with
alpha in [100, 350] and sigma in [14, 17] drawn per image (zero outside the slice, kernel cut at
4 sigma). The lattice field: U(-1, 1) on a grid x grid lattice, upsampled bicubically, times
amplitude x the side, added after the rotation and scaling.

Everything runs in float32 (float64 stays), even inside pretraining's bf16 autocast: F.affine_grid
under the CPU's bf16 autocast computed the sampling grid in bf16, which misplaced a rotated slice's
pixels by up to 2.3 px (0.38 on average) at 512 px.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    flip: float = 0.0             # probability of each of the two in-plane flips
    spatial: float = 0.67         # probability of the random affine warp (+ elastic), per image
    rotate: float = 15.0          # rotation angle drawn uniformly in [-rotate, rotate] degrees
    scale: tuple = (0.7, 1.3)     # sampling coordinates multiplied by U(scale): > 1 zooms out
    translate: float = 0.1        # shift drawn uniformly in [-translate, translate] x image size
    elastic: float = 0.67         # probability of the elastic field, among warped images
    field_first: bool = False     # the field before the rotation and scaling (x_in = A (x + d)), else after
    lattice: float = 0.06         # lattice field: amplitude x the side (sigma None)
    grid: int = 4                 # lattice field: grid x grid random values
    alpha: tuple = (100.0, 350.0)  # authors' field (sigma set): alpha in pixels
    sigma: tuple | None = None    # authors' field: Gaussian sigma in pixels, drawn per image
    intensity: float = 0.8        # probability of a random gain in [0.8, 1.2] and offset in [-0.2, 0.2]
    noise: float = 0.3            # probability of Gaussian noise with std drawn in [0, noise_std]
    noise_std: float = 0.1
    interpolation: str = "bilinear"  # of images; labels are always nearest
    padding: str = "border"       # grid_sample's padding of images outside the slice ("zeros": 0)


AUGMENTATIONS = {
    "paper": Augment(flip=0.5, rotate=180.0, translate=0.0, elastic=1.0, field_first=True, sigma=(14.0, 17.0),
                     intensity=0.0, noise=0.0, interpolation="bicubic", padding="zeros"),
    "upright": Augment(),
    "gentle": Augment(spatial=0.8, scale=(0.85, 1.15), translate=0.05, elastic=0.5, lattice=0.03,
                      intensity=0.5, noise=0.2, noise_std=0.05),
    "none": Augment(spatial=0.0, intensity=0.0, noise=0.0),
}


def gaussian_blur(x, sigma, max_sigma):
    """Blur each image of x (B, C, H, W) with its own Gaussian sigma (B,) in pixels, zero outside,
    kernel cut at 4 sigma (scipy.ndimage.gaussian_filter with mode="constant"). The kernel's size
    comes from max_sigma, a number >= every sigma, so that nothing waits for the device.

    As matrices: blurred = T_H @ x @ T_W, where T_N (N, N) holds the image's 1D kernel k along its
    diagonals, T[i, j] = k(j - i). Two batched matrix products: far faster than a convolution whose
    kernel (up to 137 taps) is as wide as the image."""
    radius = int(4 * max_sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)  # (2 radius + 1,)
    kernel = torch.exp(-0.5 * (taps / sigma[:, None]) ** 2) * (taps.abs() <= (4 * sigma[:, None] + 0.5).floor())
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, 2 radius + 1): each image's normalized kernel

    def toeplitz(n):
        i = torch.arange(n, device=x.device)
        offset = i[None, :] - i[:, None]  # (n, n): j - i
        return kernel[:, offset.clamp(-radius, radius) + radius] * (offset.abs() <= radius)  # (B, n, n)
    return toeplitz(x.shape[2])[:, None] @ x @ toeplitz(x.shape[3])[:, None]  # (B, C, H, W)


def elastic_field(config, B, H, W, uniform):
    """A (B, 2, H, W) displacement in grid_sample's units (2 / W per pixel): the lattice field, or the
    authors' (sigma set). uniform(low, high, *shape) draws the random numbers."""
    if config.sigma is None:  # coarse random values, upsampled
        field = uniform(-1.0, 1.0, B, 2, config.grid, config.grid) * 2 * config.lattice
        return F.interpolate(field, size=(H, W), mode="bicubic", align_corners=True)
    noise = uniform(-1.0, 1.0, B, 2, H, W)  # smoothed noise times alpha pixels
    sigma, alpha = uniform(*config.sigma), uniform(*config.alpha)  # (B,) each, in pixels
    field = gaussian_blur(noise, sigma, max(config.sigma)) * alpha[:, None, None, None]  # (B, 2, H, W)
    return torch.stack([field[:, 0] * (2 / W), field[:, 1] * (2 / H)], dim=1)  # pixels -> grid units


def augment(images, config, generator, labels=None):
    """images (B, 1, H, W) float, labels (B, H, W) int or None -> augmented copies (under "none",
    the images and labels themselves).

    `generator` is a torch.Generator on the images' device: the same generator state gives the
    same augmentations, which is what makes a resumed run equal an uninterrupted one."""
    if not (config.flip or config.spatial or config.intensity or config.noise):  # "none"
        return images if labels is None else (images, labels)
    with torch.autocast(images.device.type, enabled=False):  # float32 grids (module docstring)
        B, _, H, W = images.shape
        device = images.device

        def uniform(low, high, *shape):
            return low + (high - low) * torch.rand(shape or (B,), generator=generator, device=device)

        def happens(p):
            return torch.rand(B, generator=generator, device=device) < p  # (B,) bool

        # 1. one affine map per image, from output to input coordinates in grid_sample's [-1, 1]
        warp = happens(config.spatial)
        angle = torch.where(warp, uniform(-config.rotate, config.rotate), 0.0) * math.pi / 180  # (B,)
        zoom = torch.where(warp, uniform(*config.scale), 1.0)  # (B,)
        shift = torch.where(warp[:, None], uniform(-config.translate, config.translate, B, 2) * 2, 0.0)  # (B, 2); x 2: grid units
        flip_x = torch.where(happens(config.flip), -1.0, 1.0)  # (B,)
        flip_y = torch.where(happens(config.flip), -1.0, 1.0)  # (B,)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom  # (B,) each
        theta = torch.stack([torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], 1),
                             torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)  # (B, H, W, 2)

        # 2. an elastic displacement field, for the warped images drawn to be elastic
        elastic = (warp & happens(config.elastic))[:, None, None, None]  # (B, 1, 1, 1)
        field = elastic_field(config, B, H, W, uniform) * elastic  # (B, 2, H, W): d, in grid units
        if config.field_first:  # x_in = A (x + d) = A x + A d: the field turns, flips and zooms with the slice
            field = torch.einsum("bij,bjhw->bihw", theta[:, :, :2], field)  # (B, 2, H, W)
        grid = grid + field.permute(0, 2, 3, 1)  # (B, H, W, 2)

        images = F.grid_sample(images, grid.to(images.dtype), mode=config.interpolation,
                               padding_mode=config.padding, align_corners=False)  # (B, 1, H, W)
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
