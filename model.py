"""A tiny 2D U-Net in the paper's shape, its encoder on its own, and the heads of the pretext tasks.

    Encoder: `depth` (4) levels of ConvBlock = 2 x (conv 3x3, BatchNorm, LeakyReLU 0.01), each followed
             by a 2x2 max-pool; channels f, 2f, 4f, 8f, then a bottleneck ConvBlock with 16f channels.
    Decoder: per level, a 2x2 transposed convolution (stride 2) doubles H and W, the encoder's skip
             feature map of that level is concatenated, and a ConvBlock mixes them; channels 8f .. f.
    UNet:    encoder + decoder + a 1x1 convolution to per-class logits of the input's spatial size.
    ProjectionHead: global average pool of the bottleneck, Linear, ReLU, Linear -> (B, out_dim).
    RotationHead:   global average pool, Linear -> (B, 4) logits of the rotation (Rotation baseline).
    JigsawHead:     PIRL's g, from the bottlenecks of 9 tiles -> (B, out_dim) (PIRL baseline).

Pretraining trains the Encoder (with a head) alone; finetuning builds a UNet, loads only the encoder
weights with `load_encoder`, and leaves the decoder at its random initialization.
The paper uses f = 32 or 48; the default f = 16 keeps the network small enough for a CPU.
H and W must be divisible by 2**depth (16): other sizes raise a ValueError (they are not padded).
"""
import argparse

import torch
import torch.nn as nn


class ConvBlock(nn.Module):
    """Two x (conv 3x3 with padding 1, BatchNorm, LeakyReLU 0.01): (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),  # BatchNorm has the bias
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.LeakyReLU(0.01),
        )

    def forward(self, x):
        return self.body(x)


class Encoder(nn.Module):
    """The contracting half of the U-Net, pretrained on its own.

    forward(x: (B, in_channels, H, W)) returns a list of depth + 1 tensors: the skip feature maps
    (B, f * 2**k, H / 2**k, W / 2**k) for k = 0 .. depth - 1, then the bottleneck
    (B, f * 2**depth, H / 2**depth, W / 2**depth), e.g. (B, 16f, H/16, W/16) for depth 4.
    """

    def __init__(self, in_channels=1, width=16, depth=4):
        super().__init__()
        self.in_channels, self.width, self.depth = in_channels, width, depth
        channels = [width * 2**k for k in range(depth)]  # f, 2f, 4f, 8f
        self.levels = nn.ModuleList(
            ConvBlock(c_in, c_out) for c_in, c_out in zip([in_channels] + channels[:-1], channels)
        )
        self.pool = nn.MaxPool2d(2)
        self.out_channels = width * 2**depth  # 16f
        self.bottleneck = ConvBlock(channels[-1], self.out_channels)

    def check_input(self, x):
        """Raise a one-line ValueError unless x is (B, in_channels, H, W) with H, W divisible by 2**depth."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        divisor = 2**self.depth
        H, W = x.shape[-2:]
        if H % divisor or W % divisor:
            raise ValueError(f"input height and width must be divisible by 2**depth = {divisor} "
                             f"(depth {self.depth}), got H = {H}, W = {W}; crop or pad the slices")

    def forward(self, x):
        self.check_input(x)
        skips = []
        for level in self.levels:
            x = level(x)  # (B, f * 2**k, H / 2**k, W / 2**k)
            skips.append(x)
            x = self.pool(x)  # halves H and W
        return skips + [self.bottleneck(x)]  # last: (B, 16f, H / 16, W / 16) for depth 4


class Decoder(nn.Module):
    """The expanding half: from the encoder's list of features to (B, f, H, W) at full resolution."""

    def __init__(self, width=16, depth=4):
        super().__init__()
        channels = [width * 2**k for k in reversed(range(depth))]  # 8f, 4f, 2f, f
        below = [width * 2**depth] + channels[:-1]  # channels coming up from the level below: 16f .. 2f
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c_in, c, 2, stride=2) for c_in, c in zip(below, channels))
        self.blocks = nn.ModuleList(ConvBlock(2 * c, c) for c in channels)  # input: upsampled + skip

    def forward(self, features):
        *skips, x = features  # x: bottleneck (B, 16f, H / 16, W / 16)
        for up, block, skip in zip(self.ups, self.blocks, reversed(skips)):
            x = up(x)  # (B, c, 2h, 2w), the skip's size
            x = block(torch.cat([x, skip], dim=1))  # cat: (B, 2c, 2h, 2w) -> (B, c, 2h, 2w)
        return x  # (B, f, H, W)


class UNet(nn.Module):
    """U-Net for 2D segmentation: (B, in_channels, H, W) -> logits (B, num_classes, H, W)."""

    def __init__(self, in_channels=1, num_classes=4, width=16, depth=4):
        super().__init__()
        self.encoder = Encoder(in_channels, width, depth)
        self.decoder = Decoder(width, depth)
        self.final = nn.Conv2d(width, num_classes, 1)  # per-pixel class logits

    def forward(self, x):
        return self.final(self.decoder(self.encoder(x)))  # (B, num_classes, H, W)


def _few(keys, n=3):
    """At most n names of a list, then how many more: for one-line error messages."""
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_encoder(unet, encoder_state_dict):
    """Load the state dict of a pretrained `Encoder` into `unet.encoder`; the decoder is left untouched.

    The keys must match exactly (no key missing, none unexpected) and every shape must agree,
    otherwise a one-line ValueError names the offending keys.
    """
    expected = unet.encoder.state_dict()
    missing = set(expected) - set(encoder_state_dict)
    unexpected = set(encoder_state_dict) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"encoder checkpoint does not match the U-Net's encoder: {len(missing)} missing keys "
            f"[{_few(missing)}], {len(unexpected)} unexpected keys [{_few(unexpected)}]; pass an Encoder's "
            f"own state_dict (keys like 'levels.0.body.0.weight'), of the same depth")
    wrong = [k for k in expected if encoder_state_dict[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"encoder checkpoint has {len(wrong)} tensors of the wrong shape, e.g. {k}: "
            f"{tuple(encoder_state_dict[k].shape)} in the checkpoint vs {tuple(expected[k].shape)} in "
            f"the model; the checkpoint may be of another width or number of input channels "
            f"(model: width {unet.encoder.width}, in_channels {unet.encoder.in_channels})")
    unet.encoder.load_state_dict(encoder_state_dict, strict=True)


def count_parameters(module):
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class ProjectionHead(nn.Module):
    """Projection for the contrastive losses: global average pool, Linear, ReLU, Linear.

    (B, in_channels, h, w) bottleneck -> (B, out_dim). hidden defaults to in_channels
    (the paper: Linear(16f, 16f), ReLU, Linear(16f, 512); we default to out_dim 128).
    """

    def __init__(self, in_channels, hidden=None, out_dim=128):
        super().__init__()
        self.in_channels = in_channels
        hidden = in_channels if hidden is None else hidden
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, bottleneck):
        if bottleneck.dim() != 4 or bottleneck.shape[1] != self.in_channels:
            raise ValueError(f"expected a bottleneck (B, {self.in_channels}, h, w), "
                             f"got {tuple(bottleneck.shape)}")
        pooled = bottleneck.mean(dim=(2, 3))  # (B, in_channels): global average pool
        return self.mlp(pooled)  # (B, out_dim)


# ---------------------------------------------------------------------------------------------------
# Heads of the other pretext tasks (the baselines of the paper's tables): the rotation classifier
# (Gidaris et al. 2018) and PIRL's jigsaw head g (Misra and van der Maaten 2020).
# ---------------------------------------------------------------------------------------------------
class RotationHead(nn.Module):
    """Which of the rotations by k * 90 degrees (k = 0 .. 3) was applied: global average pool of the
    bottleneck, then Linear(16f, 4). (B, in_channels, h, w) -> logits (B, 4).

    A single linear layer leaves the work of telling the rotation to the encoder, which is the point."""

    def __init__(self, in_channels, rotations=4):
        super().__init__()
        self.in_channels = in_channels
        self.linear = nn.Linear(in_channels, rotations)

    def forward(self, bottleneck):
        if bottleneck.dim() != 4 or bottleneck.shape[1] != self.in_channels:
            raise ValueError(f"expected a bottleneck (B, {self.in_channels}, h, w), "
                             f"got {tuple(bottleneck.shape)}")
        return self.linear(bottleneck.mean(dim=(2, 3)))  # (B, 4)


class JigsawHead(nn.Module):
    """PIRL's g: the representation of a jigsaw-shuffled slice from the bottlenecks of its T tiles.

    (B, T, in_channels, h, w) -> (B, out_dim): each tile's bottleneck is average-pooled and mapped by
    one shared Linear(16f, tile_dim); the T vectors are concatenated in the order given (the shuffled
    order: the head never sees the permutation) and a Linear(T * tile_dim, out_dim) combines them.
    PIRL: tile_dim = out_dim = 128, T = 9."""

    def __init__(self, in_channels, tiles=9, tile_dim=128, out_dim=128):
        super().__init__()
        self.in_channels, self.tiles = in_channels, tiles
        self.tile = nn.Linear(in_channels, tile_dim)
        self.combine = nn.Linear(tiles * tile_dim, out_dim)

    def forward(self, bottlenecks):
        if bottlenecks.dim() != 5 or bottlenecks.shape[1:3] != (self.tiles, self.in_channels):
            raise ValueError(f"expected tile bottlenecks (B, {self.tiles}, {self.in_channels}, h, w), "
                             f"got {tuple(bottlenecks.shape)}")
        per_tile = self.tile(bottlenecks.mean(dim=(3, 4)))  # (B, T, tile_dim)
        return self.combine(per_tile.flatten(1))  # (B, T * tile_dim) -> (B, out_dim)


def main():
    parser = argparse.ArgumentParser(description="Print the U-Net's parameter counts and stage shapes.")
    parser.add_argument("--width", type=int, default=16, help="channels f of the first level")
    parser.add_argument("--image-size", type=int, default=128, help="side S of the sample input (1, 1, S, S)")
    args = parser.parse_args()

    unet = UNet(in_channels=1, num_classes=4, width=args.width).eval()
    head = ProjectionHead(unet.encoder.out_channels)
    counts = {"encoder": count_parameters(unet.encoder),
              "decoder": count_parameters(unet.decoder) + count_parameters(unet.final),
              "projection head": count_parameters(head)}
    print(f"width f = {args.width}: parameters")
    for name, n in counts.items():
        print(f"  {name:<16} {n:>12,}")
    print(f"  {'total':<16} {sum(counts.values()):>12,}  (U-Net {count_parameters(unet):,} + head)")

    # Record every stage's output shape with forward hooks, then run one sample through.
    stages = [(f"encoder level {k}", m) for k, m in enumerate(unet.encoder.levels)]
    stages += [("bottleneck", unet.encoder.bottleneck)]
    levels_up = reversed(range(len(unet.decoder.blocks)))  # the decoder runs from level depth-1 to 0
    stages += [(f"decoder level {k}", m) for k, m in zip(levels_up, unet.decoder.blocks)]
    stages += [("logits", unet.final), ("projection", head)]
    for name, module in stages:
        show = lambda m, inputs, out, name=name: print(f"  {name:<16} {tuple(out.shape)}")  # noqa: E731
        module.register_forward_hook(show)
    x = torch.randn(1, 1, args.image_size, args.image_size)
    print(f"stage output shapes for an input {tuple(x.shape)}:")
    with torch.no_grad():
        features = unet.encoder(x)  # what UNet.forward does, split so the head sees the bottleneck
        unet.final(unet.decoder(features))
        head(features[-1])


if __name__ == "__main__":
    main()
