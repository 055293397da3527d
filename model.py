"""The paper's 2D U-Net, its encoder on its own, and the projection head of the contrastive methods.

    Encoder: `depth` (4) levels of ConvBlock = 2 x (conv 3x3, BatchNorm, LeakyReLU 0.01), each followed
             by a 2x2 max-pool; channels f, 2f, 4f, 8f; then a bottleneck block with 16f channels
             (a ConvBlock, or with bottleneck="plain" the authors' conv, ReLU, conv, ReLU without norm).
    Decoder: per level, a 2x2 transposed convolution (stride 2) doubles H and W, the encoder's skip
             feature map of that level is concatenated, and a ConvBlock mixes them; channels 8f .. f.
    UNet:    encoder + decoder + a 1x1 convolution to per-class logits of the input's spatial size.
    ProjectionHead: global average pool of the bottleneck, Linear(16f, 16f), ReLU, Linear(16f, D).

Pretraining trains the Encoder with a head; finetuning builds a UNet, copies the encoder weights in
(`load_encoder`) and leaves the decoder at its random initialization. The paper uses f = 32 or 48;
f = 16 keeps the network small enough for a CPU. H and W must be divisible by 2**depth (16).
"""
import torch
import torch.nn as nn


class ConvBlock(nn.Module):
    """Two x (conv 3x3, BatchNorm, LeakyReLU 0.01): (B, c_in, H, W) -> (B, c_out, H, W).
    norm=False: two x (conv 3x3 with bias, ReLU), the authors' bottleneck."""

    def __init__(self, in_channels, out_channels, norm=True):
        super().__init__()
        layers = []
        for c_in in (in_channels, out_channels):
            if norm:  # no conv bias: BatchNorm has one
                layers += [nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                           nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.01)]
            else:
                layers += [nn.Conv2d(c_in, out_channels, 3, padding=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Encoder(nn.Module):
    """The contracting half of the U-Net, pretrained on its own.

    forward(x: (B, in_channels, H, W)) returns depth + 1 tensors: the skip feature maps
    (B, f * 2**k, H / 2**k, W / 2**k) for k = 0 .. depth - 1, then the bottleneck
    (B, f * 2**depth, H / 2**depth, W / 2**depth): (B, 16f, H/16, W/16) at the default depth 4."""

    def __init__(self, in_channels=1, width=16, depth=4, bottleneck="batchnorm"):
        super().__init__()
        assert bottleneck in ("batchnorm", "plain"), f"bottleneck must be batchnorm or plain, got {bottleneck}"
        self.in_channels, self.width, self.depth = in_channels, width, depth
        channels = [width * 2**k for k in range(depth)]  # f, 2f, 4f, 8f at depth 4
        self.levels = nn.ModuleList(ConvBlock(a, b) for a, b in zip([in_channels] + channels[:-1], channels))
        self.pool = nn.MaxPool2d(2)
        self.out_channels = width * 2**depth  # 16f at depth 4
        self.bottleneck = ConvBlock(channels[-1], self.out_channels, norm=bottleneck == "batchnorm")

    def forward(self, x):
        assert x.dim() == 4 and x.shape[1] == self.in_channels, \
            f"expected input (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
        assert x.shape[-2] % 2**self.depth == 0 and x.shape[-1] % 2**self.depth == 0, \
            f"H and W must be divisible by 2**depth = {2**self.depth}, got {tuple(x.shape[-2:])}"
        skips = []
        for level in self.levels:
            x = level(x)  # (B, f * 2**k, H / 2**k, W / 2**k)
            skips.append(x)
            x = self.pool(x)  # halves H and W
        return skips + [self.bottleneck(x)]  # last: (B, 16f, H / 16, W / 16) at depth 4


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

    def __init__(self, in_channels=1, num_classes=4, width=16, depth=4, bottleneck="batchnorm"):
        super().__init__()
        self.encoder = Encoder(in_channels, width, depth, bottleneck)
        self.decoder = Decoder(width, depth)
        self.final = nn.Conv2d(width, num_classes, 1)  # per-pixel class logits

    def forward(self, x):
        return self.final(self.decoder(self.encoder(x)))  # (B, num_classes, H, W)


class ProjectionHead(nn.Module):
    """Global average pool of the bottleneck (B, 16f, h, w), Linear(16f, 16f), ReLU, Linear(16f, out_dim)."""

    def __init__(self, in_channels, out_dim=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, in_channels), nn.ReLU(), nn.Linear(in_channels, out_dim))

    def forward(self, bottleneck):
        return self.mlp(bottleneck.mean(dim=(2, 3)))  # (B, 16f) pooled -> (B, out_dim)


class Pretrainer(nn.Module):
    """The encoder being pretrained and a head on its bottleneck: x (B, 1, S, S) -> head's output."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        return self.head(self.encoder(x)[-1])  # (B, D)


def init_weights(module, scheme="default"):
    """"he": the authors' init, He-normal (a = 0.01, fan_in) on every conv and transposed conv, zero
    biases; "default": PyTorch's own. Returns the module."""
    assert scheme in ("default", "he"), f"init must be default or he, got {scheme}"
    for m in module.modules():
        if scheme == "he" and isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, a=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def build_pretrainer(config):
    """The contrastive methods' network, rebuilt from a pretraining config alone."""
    encoder = Encoder(1, config["width"], bottleneck=config["bottleneck"])
    return init_weights(Pretrainer(encoder, ProjectionHead(encoder.out_channels, config["proj_dim"])), config["init"])


def build_unet(config, num_classes):
    """The segmentation U-Net of a finetuning config (width, bottleneck, init)."""
    return init_weights(UNet(1, num_classes, config["width"], bottleneck=config["bottleneck"]), config["init"])


def encoder_weights(state_dict):
    """The encoder's own state dict, out of a pretraining model's ("encoder." keys, prefix removed)."""
    return {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}


def load_encoder(unet, encoder_state_dict):
    """Copy a pretrained Encoder's weights into unet.encoder; the decoder is left as it is.
    Every key and shape must match: a one-line ValueError otherwise, before anything is copied."""
    expected = unet.encoder.state_dict()
    missing, unexpected = set(expected) - set(encoder_state_dict), set(encoder_state_dict) - set(expected)
    wrong = [k for k in set(expected) & set(encoder_state_dict) if encoder_state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"the pretrained encoder does not fit this U-Net (width {unet.encoder.width}): "
                         f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrongly shaped "
                         f"tensors, e.g. {sorted(missing | unexpected | set(wrong))[:2]}")
    unet.encoder.load_state_dict(encoder_state_dict)


def count_parameters(module):
    """Number of trainable parameters of a module."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def main():
    from runs import Parser, positive
    parser = Parser(description="Print the U-Net's parameter counts and stage shapes.")
    parser.add_argument("--width", type=positive(int), default=16, help="channels f of the first level")
    parser.add_argument("--image-size", type=positive(int), default=128, help="side S of the sample input, a multiple of 16")
    args = parser.parse_args()
    if args.image_size % 16:
        parser.error(f"--image-size must be a multiple of 16, got {args.image_size}")

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
        module.register_forward_hook(lambda m, inputs, out, name=name: print(f"  {name:<16} {tuple(out.shape)}"))
    x = torch.randn(1, 1, args.image_size, args.image_size)
    print(f"stage output shapes for an input {tuple(x.shape)}:")
    with torch.no_grad():
        features = unet.encoder(x)  # what UNet.forward does, split so the head sees the bottleneck
        unet.final(unet.decoder(features))
        head(features[-1])


if __name__ == "__main__":
    main()
