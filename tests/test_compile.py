"""torch.compile (the GPU's fast path, `pretrain.py --compile`) computes the same step as eager PyTorch."""
import copy

import torch

import pretrain
from augment import AUGMENTATIONS
from losses import pcl_mask
from model import build_pretrainer


def test_a_compiled_step_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    net = build_pretrainer(dict(width=4, proj_dim=16, bottleneck="batchnorm", init="default"))
    twin = copy.deepcopy(net)
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 1, S, S)
    positions, slices = torch.tensor([0.1, 0.15, 0.4, 0.5, 0.8, 1.0]), torch.full((6,), 20)

    def step(model, net):
        generator = torch.Generator().manual_seed(2)  # the same augmentations for both
        loss, acc = pretrain.contrastive_step(model, x, positions, slices, generator, lambda p, n: pcl_mask(p, 0.2),
                                              AUGMENTATIONS["upright"], 0.1)
        loss.backward()
        return loss.item(), acc.item(), {name: p.grad for name, p in net.named_parameters()}

    eager, compiled = step(net, net), step(torch.compile(twin), twin)
    assert abs(eager[0] - compiled[0]) < 1e-4 and eager[1] == compiled[1]
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, atol=1e-4, rtol=1e-3, msg=name)
