"""augment.py: the authors' elastic field against its formula written in numpy, and what each named
augmentation does to images and labels."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from augment import AUGMENTATIONS, Augment, augment, elastic_field, epoch_generator, gaussian_blur


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


@pytest.mark.parametrize("name", ["paper", "upright", "gentle"])
def test_augmentations_inside_bf16_autocast_are_the_float32_ones(name):
    """Pretraining augments inside bf16 autocast; a sampling grid or field rounded to bf16 would move
    pixels (up to 2 px at 512 px). Images and labels must be exactly those of a float32 run."""
    x = torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (4, 64, 64), generator=torch.Generator().manual_seed(1))
    expected = augment(x, AUGMENTATIONS[name], torch.Generator().manual_seed(2), labels=labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = augment(x, AUGMENTATIONS[name], torch.Generator().manual_seed(2), labels=labels)
    assert inside[0].dtype == torch.float32
    assert torch.equal(inside[0], expected[0]) and torch.equal(inside[1], expected[1])


def test_elastic_displacements_at_512_px_match_the_batchgenerators_formula():
    """Warp a ramp (its value is its own x coordinate, so bilinear sampling returns the sampled
    position exactly) with only the elastic field of `paper`: out - ramp is the x displacement in
    pixels. Its RMS must be that of gaussian_filter(U(-1, 1), sigma) * alpha with alpha in
    [100, 350] and sigma in [14, 17] drawn per image, within 20%."""
    S, B = 512, 6
    elastic_only = replace(AUGMENTATIONS["paper"], spatial=1.0, flip=0.0, rotate=0.0, scale=(1.0, 1.0),
                           interpolation="bilinear", padding="border")
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
    config = replace(AUGMENTATIONS[name], intensity=0.0, noise=0.0)
    images, warped = augment(x, config, torch.Generator().manual_seed(0), labels=labels)
    agree = ((images[:, 0] > 0.5).long() == warped).float().mean()
    assert agree > 0.97
    if name == "none":
        assert torch.equal(images, x) and torch.equal(warped, labels)


def test_paper_flips_and_turns_freely_upright_does_not():
    x = torch.zeros(400, 1, 32, 32)
    x[:, :, :16, :16] = 1.0  # a bright quadrant: where it ends up tells the flips and turns
    g = torch.Generator().manual_seed(0)
    corner = {name: augment(x, replace(AUGMENTATIONS[name], intensity=0.0, noise=0.0, elastic=0.0), g)[:, 0, 4:12, 4:12]
              .mean(dim=(1, 2))
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


# ---------------------------------------------------------------------------------------------------
# Each part of the warp and of the intensity change, seen in what augment returns.
# ---------------------------------------------------------------------------------------------------
def quiet(**changes):
    """An Augment that does only what `changes` asks: no warp, flip, field, gain or noise otherwise."""
    return replace(Augment(spatial=0.0, rotate=0.0, scale=(1.0, 1.0), translate=0.0, elastic=0.0, intensity=0.0,
                           noise=0.0), **changes)


def centres(n):
    """grid_sample's coordinate of each of n pixel centres (align_corners=False): (2j + 1) / n - 1."""
    return (2 * torch.arange(n, dtype=torch.float64) + 1) / n - 1


def sampled(config, B, S, seed):
    """Where each output pixel of augment(config) samples its input, in grid units: (B, 2, S, S), x then y.
    Two ramps (value = x, value = y) warped with the same draws; bilinear sampling of a ramp returns the
    sampled coordinate exactly inside the image (border padding clamps it outside)."""
    plain = replace(config, interpolation="bilinear", padding="border", intensity=0.0, noise=0.0)
    c = centres(S).float()
    ramps = [c.expand(B, 1, S, S).clone(), c[:, None].expand(B, 1, S, S).clone()]
    return torch.cat([augment(r, plain, torch.Generator().manual_seed(seed)) for r in ramps], 1).double()


def sampled_points(config, B, S, seed):
    """The affine map (B, 2, 3) fitted by least squares to where augment(config) samples without its field."""
    x_in, y_in = sampled(replace(config, elastic=0.0), B, S, seed).unbind(1)
    y_out, x_out = torch.meshgrid(centres(S), centres(S), indexing="ij")
    thetas = []
    for b in range(B):
        inside = (x_in[b].abs() < 0.9) & (y_in[b].abs() < 0.9)  # not clamped at the border
        A = torch.stack([x_out[inside], y_out[inside], torch.ones_like(x_out[inside])], 1)  # (n, 3)
        target = torch.stack([x_in[b][inside], y_in[b][inside]], 1)  # (n, 2)
        thetas.append(torch.linalg.lstsq(A, target).solution.T)  # (2, 3)
    return torch.stack(thetas)


def test_the_authors_field_comes_before_the_rotation_flips_and_zoom_and_the_lattice_after():
    """batchgenerators samples at A (x + d): the displacement A d turns, flips and zooms with the slice.
    The lattice field is added after: A x + d. d is the field of the same draws with no warp (the
    draws do not depend on the angle, zoom or flips); A is fitted from the warp without the field."""
    S, B = 48, 6
    for config, first in ((AUGMENTATIONS["paper"], True), (replace(AUGMENTATIONS["upright"], flip=0.5, elastic=1.0), False)):
        config = replace(config, spatial=1.0, rotate=180.0, scale=(0.7, 1.3))
        still = replace(config, rotate=0.0, scale=(1.0, 1.0), translate=0.0, flip=0.0)
        points = [sampled(c, B, S, 3) for c in (still, replace(still, elastic=0.0), config, replace(config, elastic=0.0))]
        d, moved = points[0] - points[1], points[2] - points[3]  # (B, 2, S, S) each
        A = sampled_points(config, B, S, 3)[:, :, :2]  # (B, 2, 2)
        expected = torch.einsum("bij,bjhw->bihw", A, d) if first else d
        inside = torch.stack([(p.abs() < 0.9).all(1) for p in points]).all(0)  # (B, S, S): no sample clamped
        assert inside.sum() > B * S * S / 5 and d[inside.unsqueeze(1).expand_as(d)].abs().mean() > 0.01
        assert (moved - expected).abs().amax(1)[inside].max() < 1e-3, config


def test_the_warp_is_a_rotation_zoom_and_shift_drawn_over_their_whole_ranges():
    """Each image's map is zoom * R(angle) * flips + shift with R = [[cos, -sin], [sin, cos]]; the angle
    covers [-rotate, rotate] on both sides, the zoom all of `scale` and the shift +-translate x the side."""
    config = quiet(spatial=1.0, rotate=15.0, scale=(0.7, 1.3), translate=0.1)
    theta = sampled_points(config, 300, 32, seed=0)
    M, shift = theta[:, :, :2], theta[:, :, 2]  # (B, 2, 2), (B, 2)
    zoom = M.det().abs().sqrt()  # (B,)
    R = M / zoom[:, None, None]
    torch.testing.assert_close(R @ R.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(300, 2, 2), atol=1e-3, rtol=0)
    assert (M.det() > 0).all()  # no flips asked: a rotation, not a reflection
    angle = torch.atan2(R[:, 1, 0], R[:, 0, 0]) * 180 / math.pi  # R[1, 0] = +sin
    assert angle.abs().max() <= 15.01 and angle.min() < -12 and angle.max() > 12
    assert zoom.min() >= 0.7 - 1e-3 and zoom.max() <= 1.3 + 1e-3 and zoom.min() < 0.75 and zoom.max() > 1.25
    assert shift.abs().max() <= 0.2 + 1e-3 and shift.abs().max() > 0.18  # 0.1 x the side = 0.2 grid units


def test_the_two_flips_are_drawn_independently():
    """flip = 0.5 per axis: a reflection (one flip, determinant < 0) in about half the images."""
    theta = sampled_points(quiet(flip=0.5), 400, 16, seed=1)
    reflected = (theta[:, :, :2].det() < 0).float().mean().item()
    assert 0.4 < reflected < 0.6
    assert torch.allclose(theta[:, :, :2].abs(), torch.eye(2, dtype=torch.float64).expand(400, 2, 2), atol=1e-6)


def test_a_flip_alone_still_flips():
    """A configuration that only flips is not `none`: with flip = 1 every image is mirrored along both axes."""
    x = torch.rand(3, 1, 8, 12, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 4, (3, 8, 12), generator=torch.Generator().manual_seed(1))
    images, warped = augment(x, quiet(flip=1.0), torch.Generator().manual_seed(2), labels=labels)
    torch.testing.assert_close(images, x.flip(2, 3), atol=1e-5, rtol=0)
    assert torch.equal(warped, labels.flip(1, 2))


def test_the_paper_warp_is_bicubic_with_zero_padding_and_labels_nearest_with_background_outside():
    """A zoom alone (x 1.5, known grid x_in = 1.5 x_out) under `paper`'s sampling: images bicubic with
    zeros outside the slice; labels the nearest input pixel by hand, background (0) outside."""
    S = 16
    config = quiet(spatial=1.0, scale=(1.5, 1.5), interpolation="bicubic", padding="zeros")
    x = torch.rand(2, 1, S, S, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1
    labels = torch.randint(1, 6, (2, S, S), generator=torch.Generator().manual_seed(1)) * 2  # 2, 4, .., 10
    images, warped = augment(x, config, torch.Generator().manual_seed(2), labels=labels)
    c = centres(S) * 1.5
    grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), -1).expand(2, S, S, 2)  # (B, S, S, (x, y))
    expected = torch.nn.functional.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)  # augment's grid is float32
    assert images[:, 0, 0, 0].abs().max() < 1e-6  # the corner samples outside the slice: zero, not the border
    index = torch.floor((c + 1) * S / 2)  # the input pixel holding each sampled point (never on an edge here)
    for b in range(2):
        for i in range(S):
            for j in range(S):
                r, q = int(index[i]), int(index[j])
                inside = 0 <= r < S and 0 <= q < S
                assert warped[b, i, j].item() == (labels[b, r, q].item() if inside else 0), (b, i, j)


def recorded_uniform(seed, B):
    """elastic_field's uniform(low, high, *shape) (no shape: one number per image), keeping every draw in order."""
    draws, values = torch.Generator().manual_seed(seed), []

    def uniform(low, high, *shape):
        values.append(low + (high - low) * torch.rand(shape or (B,), generator=draws, dtype=torch.float64))
        return values[-1]
    return uniform, values


def test_non_square_slices_keep_their_shape_and_the_field_its_units():
    """augment takes (B, 1, H, W): a rectangle stays H x W, and the authors' field converts x pixels
    with 2 / W and y pixels with 2 / H."""
    x = torch.rand(2, 1, 24, 40, generator=torch.Generator().manual_seed(0))
    assert augment(x, AUGMENTATIONS["upright"], torch.Generator().manual_seed(1)).shape == (2, 1, 24, 40)
    uniform, values = recorded_uniform(3, B=2)
    config = Augment(sigma=(2.0, 3.0), alpha=(5.0, 9.0))
    field = elastic_field(config, 2, 24, 40, uniform)
    noise, sigma, alpha = values
    for b in range(2):
        for axis, side in ((0, 40), (1, 24)):
            expected = gaussian_filter(noise[b, axis].numpy(), float(sigma[b])) * float(alpha[b]) * 2 / side
            np.testing.assert_allclose(field[b, axis].numpy(), expected, atol=1e-10)


def cubic(t, a=-0.75):
    """The cubic convolution kernel of bicubic interpolation (Keys, a = -0.75 as torch)."""
    t = abs(t)
    return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else (a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0)


def test_the_lattice_field_is_bicubic_upsampling_of_its_values_times_twice_the_amplitude():
    """The lattice field: U(-1, 1) on grid x grid nodes at the corners' pixels (align_corners), upsampled
    with cubic convolution (indices clamped at the edge), times amplitude x the side = 2 x lattice grid units."""
    config = Augment(lattice=0.05, grid=4)
    uniform, values = recorded_uniform(0, B=1)
    H, W = 7, 10
    field = elastic_field(config, 1, H, W, uniform)  # (1, 2, H, W)
    nodes = values[0][0] * 2 * 0.05  # (2, 4, 4)
    def weights(n):  # (n, 4): the weight of every node for each output pixel, along one axis
        w = torch.zeros(n, 4, dtype=torch.float64)
        for i in range(n):
            s = i * 3 / (n - 1)  # align_corners: pixel 0 at node 0, pixel n - 1 at node 3
            f = math.floor(s)
            for k in range(f - 1, f + 3):
                w[i, min(max(k, 0), 3)] += cubic(s - k)
        return w
    expected = weights(H) @ nodes @ weights(W).T  # (2, H, W)
    torch.testing.assert_close(field[0].double(), expected, atol=1e-5, rtol=0)


def test_gain_then_offset_over_their_ranges_and_no_noise_unless_drawn():
    """intensity = 1, noise = 0: every image is exactly gain * x + offset, gain in [0.8, 1.2] and offset
    in [-0.2, 0.2] (each over its whole range), with nothing left over."""
    B = 2000
    x = torch.rand(B, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = augment(x, quiet(intensity=1.0, noise=0.0, noise_std=0.1), torch.Generator().manual_seed(1))
    xs, ys = x.flatten(1), out.flatten(1)
    gain = ((xs - xs.mean(1, keepdim=True)) * (ys - ys.mean(1, keepdim=True))).sum(1) / (xs - xs.mean(1, keepdim=True)).pow(2).sum(1)
    offset = ys.mean(1) - gain * xs.mean(1)
    torch.testing.assert_close(ys, gain[:, None] * xs + offset[:, None], atol=1e-6, rtol=0)  # no noise
    assert gain.min() >= 0.8 - 1e-6 and gain.max() <= 1.2 + 1e-6 and gain.min() < 0.81 and gain.max() > 1.19
    assert offset.abs().max() <= 0.2 + 1e-6 and offset.min() < -0.19 and offset.max() > 0.19


def test_noise_alone_has_a_std_drawn_up_to_noise_std():
    """intensity = 0, noise = 1: x plus Gaussian noise, its std drawn per image in [0, noise_std]."""
    x = torch.rand(400, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = augment(x, quiet(noise=1.0, noise_std=0.1), torch.Generator().manual_seed(1))
    std = (out - x).flatten(1).std(dim=1)
    assert std.max() < 0.11 and std.max() > 0.095 and std.min() < 0.01
