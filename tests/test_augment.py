"""augment.py: the authors' elastic field against its formula written in numpy, and what each named
augmentation does to images and labels."""
import math

import numpy as np
import pytest
import torch

from augment import AUGMENTATIONS, Augment, augment, epoch_generator, gaussian_blur


def gaussian_filter(a, sigma):
    """scipy.ndimage.gaussian_filter(a, sigma, mode="constant", cval=0) (truncate 4), written out:
    a normalized 1D Gaussian of radius int(4 sigma + 0.5), convolved along each axis, zeros outside."""
    radius = int(4 * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w /= w.sum()
    def along(r):  # the full convolution, cut to the signal's own pixels
        return np.convolve(r, w)[radius:radius + len(r)]
    return np.apply_along_axis(along, 1, np.apply_along_axis(along, 0, a))


@pytest.mark.parametrize("sigma", [(2.5, 4.0), (14.0, 17.0)], ids=["small", "kernel wider than the image"])
def test_gaussian_blur_is_the_constant_mode_gaussian_filter(sigma):
    noise = torch.rand(2, 2, 40, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    sigma = torch.tensor(sigma, dtype=torch.float64)  # one sigma per image
    got = gaussian_blur(noise, sigma, max_sigma=float(sigma.max()))
    wider = gaussian_blur(noise, sigma, max_sigma=float(sigma.max()) + 5)  # more taps, all zero
    np.testing.assert_allclose(wider.numpy(), got.numpy(), atol=1e-12)
    for b in range(2):
        for c in range(2):
            np.testing.assert_allclose(got[b, c].numpy(), gaussian_filter(noise[b, c].numpy(), float(sigma[b])), atol=1e-12)


def test_the_blur_stays_float32_under_autocast():
    """Pretraining augments inside bf16 autocast; the displacement field must not lose its precision."""
    noise, sigma = torch.rand(2, 2, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([14.0, 16.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = gaussian_blur(noise, sigma, max_sigma=17.0)
    assert torch.equal(inside, gaussian_blur(noise, sigma, max_sigma=17.0))


def test_elastic_displacements_at_512_px_match_the_batchgenerators_formula():
    """Warp a ramp (its value is its own x coordinate, so bilinear sampling returns the sampled
    position exactly) with only the elastic field of `paper`: out - ramp is the x displacement in
    pixels. Its RMS must be that of gaussian_filter(U(-1, 1), sigma) * alpha with alpha in
    [100, 350] and sigma in [14, 17] drawn per image, within 20%."""
    S, B = 512, 6
    elastic_only = Augment(**{**AUGMENTATIONS["paper"].__dict__, "spatial": 1.0, "flip": 0.0, "rotate": 0.0,
                              "scale": (1.0, 1.0), "interpolation": "bilinear", "padding": "border"})
    ramp = torch.arange(S, dtype=torch.float32).expand(B, 1, S, S).clone()  # (B, 1, S, S): value = x
    moved = augment(ramp, elastic_only, torch.Generator().manual_seed(1))
    inner = slice(64, S - 64)  # away from the border, where the image would be clamped
    ours = (moved - ramp)[:, 0, inner, inner].pow(2).mean().sqrt().item()

    rng = np.random.default_rng(0)
    fields = [gaussian_filter(rng.uniform(-1, 1, (S, S)), rng.uniform(14, 17)) * rng.uniform(100, 350)
              for _ in range(B)]
    theirs = math.sqrt(np.mean([(f[inner, inner] ** 2).mean() for f in fields]))
    assert 1.0 < theirs < 6.0  # a few pixels, as batchgenerators' at 512 px
    assert ours == pytest.approx(theirs, rel=0.2)


@pytest.mark.parametrize("name", list(AUGMENTATIONS))
def test_labels_follow_the_images(name):
    """A label map equal to the thresholded image stays equal to it after the warp (nearest vs
    bilinear differ only on the boundary)."""
    x = torch.zeros(8, 1, 64, 64)
    x[:, :, 20:44, 16:40] = 1.0
    labels = (x[:, 0] > 0.5).long()
    config = Augment(**{**AUGMENTATIONS[name].__dict__, "intensity": 0.0, "noise": 0.0})
    images, warped = augment(x, config, torch.Generator().manual_seed(0), labels=labels)
    agree = ((images[:, 0] > 0.5).long() == warped).float().mean()
    assert agree > 0.97
    if name == "none":
        assert torch.equal(images, x) and torch.equal(warped, labels)


def test_paper_flips_and_turns_freely_upright_does_not():
    x = torch.zeros(400, 1, 32, 32)
    x[:, :, :16, :16] = 1.0  # a bright quadrant: where it ends up tells the flips and turns
    g = torch.Generator().manual_seed(0)
    corner = {name: augment(x, Augment(**{**AUGMENTATIONS[name].__dict__, "intensity": 0.0, "noise": 0.0,
                                          "elastic": 0.0}), g)[:, 0, 4:12, 4:12].mean(dim=(1, 2))
              for name in ("paper", "upright")}
    assert (corner["paper"] < 0.5).float().mean() > 0.6  # moved away in most images
    assert (corner["upright"] > 0.5).float().mean() > 0.9  # stays put


def test_the_same_generator_state_gives_the_same_augmentation():
    x = torch.randn(4, 1, 32, 32)
    for config in AUGMENTATIONS.values():
        a = augment(x, config, torch.Generator().manual_seed(5))
        assert torch.equal(a, augment(x, config, torch.Generator().manual_seed(5)))


def test_only_warped_images_get_an_elastic_field():
    """The elastic field is drawn among the warped images (Augment.elastic): with no warp, nothing moves."""
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    still = Augment(spatial=0.0, elastic=1.0, intensity=0.0, noise=1.0, noise_std=0.0)  # noise of std 0: a no-op
    torch.testing.assert_close(augment(x, still, torch.Generator().manual_seed(1)), x, atol=1e-5, rtol=0)


def test_every_seed_epoch_and_rank_draws_its_own_augmentations():
    seeds = [epoch_generator("cpu", seed, epoch, rank).initial_seed()
             for seed in range(3) for epoch in range(50) for rank in range(4)]
    assert len(set(seeds)) == len(seeds)  # no two epochs (or processes, or runs) replay one another's views
