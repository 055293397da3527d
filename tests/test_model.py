"""Tests of model.py: shapes of every stage, hand-counted parameters, the authors' variants, encoder loading."""
import copy
import math
import sys

import pytest
import torch

import model
from model import ConvBlock, Encoder, ProjectionHead, UNet, count_parameters, init_weights, load_encoder


def randomize(module, seed):
    """Fill every parameter and BatchNorm buffer with random values, so that two modules differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
    return module


# ---------------------------------------------------------------------------------------------------
# Shapes.
# ---------------------------------------------------------------------------------------------------
def test_unet_returns_logits_of_the_input_size():
    net = UNet(in_channels=2, num_classes=3, width=4)
    logits = net(torch.randn(2, 2, 32, 48))
    assert logits.shape == (2, 3, 32, 48)
    assert torch.isfinite(logits).all()


def test_encoder_feature_and_bottleneck_shapes():
    features = Encoder(in_channels=1, width=4, depth=4)(torch.randn(2, 1, 32, 64))
    assert [tuple(f.shape) for f in features] == [(2, 4, 32, 64), (2, 8, 16, 32), (2, 16, 8, 16),
                                                  (2, 32, 4, 8), (2, 64, 2, 4)]  # last: (B, 16f, H/16, W/16)
    assert Encoder(width=4).out_channels == 64
    shallow = Encoder(in_channels=3, width=5, depth=2)
    assert [tuple(f.shape) for f in shallow(torch.randn(1, 3, 12, 8))] == [(1, 5, 12, 8), (1, 10, 6, 4),
                                                                         (1, 20, 3, 2)]
    assert UNet(in_channels=3, num_classes=2, width=5, depth=2)(torch.randn(1, 3, 12, 8)).shape == (1, 2, 12, 8)


def test_every_parameter_gets_a_gradient():
    net = UNet(width=4)
    net(torch.randn(2, 1, 16, 16)).square().mean().backward()
    names = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []  # decoder, skips and final conv are all wired in


@torch.no_grad()
def test_every_skip_connection_reaches_the_output():
    """Zeroing the features that one encoder level hands the decoder (its skip, not the path to the
    level below, which is pooled before) changes the logits. Gradients alone cannot show a dropped skip:
    every level still gets one through the pooling path. Train mode: batch statistics, so no BatchNorm's
    initial running statistics shrink the change."""
    torch.manual_seed(0)
    net, x = UNet(width=4).train(), torch.randn(2, 1, 32, 32)
    logits = net(x)  # (2, 4, 32, 32)
    for k in range(4):
        hook = net.encoder.register_forward_hook(
            lambda module, inputs, features, k=k: [torch.zeros_like(f) if j == k else f for j, f in enumerate(features)])
        assert (net(x) - logits).abs().max() > 0.1, f"the skip of level {k} does not reach the output"
        hook.remove()


def test_projection_head_pools_then_projects():
    head = ProjectionHead(64)
    assert head.mlp[0].out_features == 64  # Linear(16f, 16f), as the paper
    bottleneck = torch.randn(3, 64, 2, 4)
    out = head(bottleneck)
    assert out.shape == (3, 128)
    pooled = bottleneck.mean(dim=(2, 3), keepdim=True).expand(3, 64, 5, 5)  # same channel means
    torch.testing.assert_close(head(pooled), out)
    assert ProjectionHead(64, out_dim=512)(bottleneck).shape == (3, 512)


# ---------------------------------------------------------------------------------------------------
# Parameter counts against a hand formula.
# ---------------------------------------------------------------------------------------------------
def conv_block_count(c_in, c_out):
    return 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + 2 * c_out  # two bias-free convs, two BNs


def test_count_parameters_by_hand():
    f, classes = 4, 3
    encoder = sum(conv_block_count(a, b) for a, b in [(1, f), (f, 2 * f), (2 * f, 4 * f), (4 * f, 8 * f),
                                                      (8 * f, 16 * f)])
    ups = sum(4 * 2 * c * c + c for c in [8 * f, 4 * f, 2 * f, f])  # ConvTranspose2d(2c, c, 2) + bias
    blocks = sum(conv_block_count(2 * c, c) for c in [8 * f, 4 * f, 2 * f, f])
    final = f * classes + classes
    net = UNet(in_channels=1, num_classes=classes, width=f)
    assert count_parameters(net.encoder) == encoder
    assert count_parameters(net) == encoder + ups + blocks + final
    assert count_parameters(ProjectionHead(64, out_dim=16)) == 64 * 64 + 64 + 64 * 16 + 16
    net.encoder.requires_grad_(False)  # frozen parameters are not counted
    assert count_parameters(net) == ups + blocks + final
    assert count_parameters(ConvBlock(3, 7)) == conv_block_count(3, 7)


def test_bad_shapes_fail_with_a_reason():
    with pytest.raises(AssertionError, match=r"divisible by 2\*\*depth = 16, got \(30, 32\)"):
        Encoder(width=4)(torch.randn(1, 1, 30, 32))
    with pytest.raises(AssertionError, match=r"expected input \(B, 1, H, W\)"):
        UNet(width=4)(torch.randn(1, 3, 16, 16))
    Encoder(width=4, depth=2)(torch.randn(1, 1, 12, 12))  # 12 is divisible by 2**2: accepted


# ---------------------------------------------------------------------------------------------------
# The authors' bottleneck and initialization.
# ---------------------------------------------------------------------------------------------------
def test_plain_bottleneck_is_conv_relu_conv_relu_without_norm():
    encoder = Encoder(width=4, bottleneck="plain")
    layers = list(encoder.bottleneck.body)
    assert [type(m) for m in layers] == [torch.nn.Conv2d, torch.nn.ReLU, torch.nn.Conv2d, torch.nn.ReLU]
    assert all(m.bias is not None for m in layers[::2])
    plain_params = 9 * 32 * 64 + 64 + 9 * 64 * 64 + 64  # two convs with biases, 8f -> 16f -> 16f
    assert count_parameters(encoder.bottleneck) == plain_params
    x = torch.randn(2, 1, 16, 16)
    assert encoder(x)[-1].min() >= 0  # ReLU output
    assert UNet(width=4, bottleneck="plain")(x).shape == (2, 4, 16, 16)


def test_he_init_draws_every_conv_from_the_kaiming_normal_and_zeroes_biases():
    torch.manual_seed(0)
    net = init_weights(UNet(width=8, bottleneck="plain"), "he")
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert len(convs) == 2 * 5 + 4 + 2 * 4 + 1
    for m in convs:
        fan_in = m.weight.shape[1] * m.weight[0, 0].numel()  # PyTorch's fan_in (dim 1; for a transposed conv, out)
        expected = math.sqrt(2 / (1 + 0.01 ** 2)) / math.sqrt(fan_in)
        if m.weight.numel() > 2000:  # enough draws for the sample std to be within 10%
            assert m.weight.std().item() == pytest.approx(expected, rel=0.1), m
        assert m.bias is None or (m.bias == 0).all()
    linear = torch.nn.Linear(4, 4)
    before = linear.weight.clone()
    init_weights(linear, "he")
    assert torch.equal(linear.weight, before)  # Linear layers keep PyTorch's init, as the authors'


# ---------------------------------------------------------------------------------------------------
# Loading a pretrained encoder into a U-Net.
# ---------------------------------------------------------------------------------------------------
def test_load_encoder_copies_the_encoder_and_leaves_the_decoder():
    pretrained = randomize(Encoder(width=4), seed=1)
    net = UNet(width=4)
    decoder_before = copy.deepcopy({k: v for k, v in net.state_dict().items() if not k.startswith("encoder.")})
    assert not torch.equal(net.encoder.levels[0].body[0].weight, pretrained.levels[0].body[0].weight)
    load_encoder(net, pretrained.state_dict())
    for key, value in pretrained.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[key], value), key
    for key, value in net.state_dict().items():
        if not key.startswith("encoder."):
            assert torch.equal(value, decoder_before[key]), key
    x = torch.randn(2, 1, 16, 16)
    for got, expected in zip(net.eval().encoder(x), pretrained.eval()(x)):  # same function after loading
        torch.testing.assert_close(got, expected)


def test_load_encoder_rejects_a_renamed_key_and_loads_nothing():
    net = UNet(width=4)
    before = copy.deepcopy(net.state_dict())
    state = randomize(Encoder(width=4), seed=2).state_dict()
    state["levels.0.body.0.weights"] = state.pop("levels.0.body.0.weight")
    with pytest.raises(ValueError, match=r"1 missing, 1 unexpected, 0 wrongly shaped tensors, "
                                         r"e.g. \['levels\.0\.body\.0\.weight', 'levels\.0\.body\.0\.weights'\]"):
        load_encoder(net, state)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_load_encoder_rejects_other_width_depth_bottleneck_or_a_whole_unet():
    net = UNet(width=4)
    with pytest.raises(ValueError, match=r"width 4\): 0 missing, 0 unexpected, 50 wrongly shaped"):
        load_encoder(net, Encoder(width=8).state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_encoder(net, Encoder(width=4, depth=3).state_dict())
    with pytest.raises(ValueError, match="missing"):
        load_encoder(net, Encoder(width=4, bottleneck="plain").state_dict())
    with pytest.raises(ValueError, match=r"unexpected"):
        load_encoder(net, UNet(width=4).state_dict())


# ---------------------------------------------------------------------------------------------------
# `python model.py` prints counts and every stage's shape.
# ---------------------------------------------------------------------------------------------------
def test_main_prints_counts_and_stage_shapes(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["model.py", "--width", "4", "--image-size", "32"])
    model.main()
    out = capsys.readouterr().out
    assert f"{count_parameters(UNet(width=4)):,}" in out
    for line in ["encoder level 0  (1, 4, 32, 32)", "bottleneck       (1, 64, 2, 2)",
                 "decoder level 0  (1, 4, 32, 32)", "logits           (1, 4, 32, 32)",
                 "projection       (1, 128)"]:
        assert line in out


# ---------------------------------------------------------------------------------------------------
# What the layers compute, against hand-written arithmetic.
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_a_conv_block_leaks_a_hundredth_of_a_negative_input_through_each_of_its_two_activations():
    """LeakyReLU(0.01), as the authors: each 3x3 conv made the identity (centre tap 1) and each BatchNorm the
    identity (eval, mean 0, var 1), a pixel of -1 comes out as -1 * 0.01**2, shrunk twice by BatchNorm's eps."""
    block = ConvBlock(1, 1).eval()
    for m in block.body:
        if isinstance(m, torch.nn.Conv2d):
            m.weight.zero_()
            m.weight[0, 0, 1, 1] = 1.0
    x = torch.tensor([-1.0, 2.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()  # (1, 1, 2, 2)
    eps = block.body[1].eps
    expected = torch.tensor([-1.0 * 0.01 ** 2, 2.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2) / (1 + eps)
    torch.testing.assert_close(block(x), expected)


@torch.no_grad()
def test_each_encoder_level_hands_the_next_the_2x2_maximum_of_its_output():
    """The encoder's down-sampling is a 2x2 max-pool (the paper's U-Net), written out here as the maximum of
    each 2x2 block; an average pool has the same shapes and would go unseen by a shape test."""
    encoder, seen = Encoder(width=4).eval(), {}
    encoder.levels[0].register_forward_hook(lambda m, inputs, out: seen.update(out=out))
    encoder.levels[1].register_forward_pre_hook(lambda m, inputs: seen.update(into=inputs[0]))
    encoder(torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    out = seen["out"]  # (2, 4, 32, 32)
    blocks = out.reshape(2, 4, 16, 2, 16, 2)  # (B, C, h, 2, w, 2): each 2x2 block
    expected = blocks.amax(dim=(3, 5))
    assert not torch.allclose(expected, blocks.mean(dim=(3, 5)))
    torch.testing.assert_close(seen["into"], expected)


def test_a_width_not_divisible_by_16_fails_with_a_reason():
    """The check covers W as well as H: a bad W alone must be refused with the reason, not a concat error."""
    with pytest.raises(AssertionError, match=r"divisible by 2\*\*depth = 16, got \(32, 30\)"):
        Encoder(width=4)(torch.randn(1, 1, 32, 30))


@pytest.mark.parametrize("build", ["unet", "pretrainer"])
def test_the_builders_apply_the_config_s_init(build):
    """--init he reaches the networks finetune.py and pretrain.py build: every conv bias zero (PyTorch's own
    init draws them at random), including the U-Net's final 1x1 conv and the plain bottleneck's."""
    config = dict(width=4, bottleneck="plain", proj_dim=16)
    make = (lambda c: model.build_unet(c, 3)) if build == "unet" else model.build_pretrainer
    for init, zero in (("he", True), ("default", False)):
        torch.manual_seed(0)
        net = make(dict(config, init=init))
        biases = [m.bias for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.bias is not None]
        assert len(biases) >= 2 and all(bool((b == 0).all()) for b in biases) == zero, init


def test_load_encoder_counts_missing_and_unexpected_tensors_apart():
    """The refusal says which way the state differs: two keys taken out of the encoder's own state and one
    foreign key added are 2 missing and 1 unexpected, not the other way round."""
    state = Encoder(width=4).state_dict()
    del state["levels.1.body.0.weight"], state["bottleneck.body.3.weight"]
    state["head.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"\): 2 missing, 1 unexpected, 0 wrongly shaped tensors"):
        load_encoder(UNet(width=4), state)


@torch.no_grad()
def test_projection_head_is_linear_relu_linear_on_the_channel_means():
    """The head against its formula written out: W2 relu(W1 m + b1) + b2, m the mean over every position of
    each channel; a bottleneck with negative means, so that a ReLU before W1 or none after it would show."""
    head = ProjectionHead(8, out_dim=5)
    bottleneck = torch.randn(3, 8, 2, 4, generator=torch.Generator().manual_seed(1)) - 0.5
    m = bottleneck.sum(dim=3).sum(dim=2) / 8  # (3, 8): the channel means
    assert (m < 0).any()
    (w1, b1), (w2, b2) = (head.mlp[0].weight, head.mlp[0].bias), (head.mlp[2].weight, head.mlp[2].bias)
    hidden = m @ w1.T + b1
    assert (hidden < 0).any() and (hidden > 0).any()
    torch.testing.assert_close(head(bottleneck), hidden.clamp(min=0) @ w2.T + b2)


def test_main_s_parameter_counts_add_up_to_the_u_net_and_the_head(monkeypatch, capsys):
    """encoder + decoder (with its final 1x1 convolution) is the U-Net; with the projection head, the total."""
    monkeypatch.setattr(sys, "argv", ["model.py", "--width", "4", "--image-size", "32"])
    model.main()
    counts = {line[:18].strip(): int(line[18:31].replace(",", "")) for line in capsys.readouterr().out.splitlines()[1:5]}
    unet = UNet(width=4)
    assert counts == {"encoder": count_parameters(unet.encoder),
                      "decoder": count_parameters(unet) - count_parameters(unet.encoder),
                      "projection head": count_parameters(ProjectionHead(unet.encoder.out_channels)),
                      "total": count_parameters(unet) + count_parameters(ProjectionHead(unet.encoder.out_channels))}
