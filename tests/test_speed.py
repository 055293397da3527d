"""The GPU's fast path: the training loops never wait for the device inside an epoch, and torch.compile
(`pretrain.py --compile`) computes the same step as eager PyTorch."""
import copy
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import finetune
import pretrain
from augment import AUGMENTATIONS
from losses import contrastive_step, positives_of
from model import build_pretrainer
from runs import amp_context, grad_scaler

# The operators that make the host wait for a CUDA device: reading a value (.item(), bool(), float(),
# int(), an `if` or `assert` on a tensor), data-dependent shapes, and tensors built from Python data
# (torch.tensor(..., device="cuda") copies from pageable memory and waits for the copy).
WAITS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select", "_unique2",
         "unique_dim", "unique_consecutive", "lift_fresh"}


class DeviceWaits(TorchDispatchMode):
    """Records every operator of WAITS that runs while it is active, and where our code called it."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        bool_index = name == "index" and any(t is not None and t.dtype == torch.bool for t in args[1])
        if name in WAITS or bool_index:
            stack = traceback.extract_stack()
            if not any("torch/optim/" in frame.filename for frame in stack):  # Adam's step counter lives on the CPU
                ours = [f"{frame.filename.split('/')[-1]}:{frame.lineno}" for frame in stack if "site-packages" not in frame.filename]
                self.calls.append(f"{name} at {ours[-1]}")
        return func(*args, **(kwargs or {}))


def watch_steps(module, monkeypatch):
    """Watch what runs between the batches of module's training loop: the steps, not the loader."""
    waits = DeviceWaits()

    def loop(loader, **kwargs):
        for batch in loader:  # fetched outside the watch (in loader processes on CUDA)
            with waits:
                yield batch  # the loop's step runs here
    monkeypatch.setattr(module, "tqdm", loop)
    return waits


@pytest.mark.parametrize("extra", [["--method", "pcl"], ["--method", "pcl", "--augment", "paper"],
                                   ["--method", "gcl", "--partition-rule", "authors"],
                                   ["--method", "simclr", "--separate-views"], ["--method", "rotation"],
                                   ["--method", "pirl"]], ids=lambda extra: " ".join(extra[1:]))
def test_a_pretraining_step_never_waits_for_the_device(tiny, tmp_path, monkeypatch, extra):
    waits = watch_steps(pretrain, monkeypatch)
    tiny.pretrain(tmp_path / "run", *extra)
    assert waits.calls == []


def test_a_finetuning_step_never_waits_for_the_device(tiny, pretrained, tmp_path, monkeypatch):
    waits = watch_steps(finetune, monkeypatch)
    tiny.finetune(pretrained, tmp_path / "run", "--augment", "paper", "--dice-weight", "1")
    assert waits.calls == []


def test_the_watch_sees_a_wait():
    """The oracle itself: .item(), an assert on a tensor and torch.tensor are each seen."""
    with DeviceWaits() as waits:
        x = torch.ones(3)
        x.sum().item()
        assert x.any()
        torch.tensor([1.0, 2.0])
        x[x > 0]
    assert [call.split(" at ")[0] for call in waits.calls] == ["_local_scalar_dense"] * 2 + ["lift_fresh", "index"]


def test_fp16_loss_scaling_keeps_the_gradients_that_fp16_flushes_to_zero():
    """A loss of 1e-9 x sum(layer(x)): its gradient of 1e-9 per output is below fp16's smallest number,
    so unscaled fp16 gradients are all zero. grad_scaler's gradients, unscaled, match float32's."""
    torch.manual_seed(0)
    layer, x, cpu = torch.nn.Linear(64, 64), torch.randn(8, 64), torch.device("cpu")

    def weight_grad(amp, scaler):
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
        layer.zero_grad()
        with amp_context(cpu, amp):
            loss = layer(x).float().sum() * 1e-9
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # nothing to undo when disabled
        return layer.weight.grad.clone()

    reference = weight_grad("off", grad_scaler(cpu, "off"))  # float32: 1e-9 x sum of x over the batch
    assert torch.all(weight_grad("fp16", torch.amp.GradScaler("cpu", enabled=False)) == 0)
    torch.testing.assert_close(weight_grad("fp16", grad_scaler(cpu, "fp16")), reference, rtol=2e-3, atol=1e-12)


def test_a_compiled_step_gives_the_eager_loss_and_gradients():
    torch.manual_seed(0)
    net = build_pretrainer(dict(width=4, proj_dim=16, bottleneck="batchnorm", init="default"))
    twin = copy.deepcopy(net)
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(1))  # (B, 1, S, S)
    positions, slices = torch.tensor([0.1, 0.15, 0.4, 0.5, 0.8, 1.0]), torch.full((6,), 20)

    def step(model, net):
        generator = torch.Generator().manual_seed(2)  # the same augmentations for both
        loss, acc = contrastive_step(model, x, positions, slices, generator, positives_of("pcl", 0.2),
                                     AUGMENTATIONS["upright"], 0.1)
        loss.backward()
        return loss.item(), acc.item(), {name: p.grad for name, p in net.named_parameters()}

    eager, compiled = step(net, net), step(torch.compile(twin), twin)
    assert abs(eager[0] - compiled[0]) < 1e-4 and eager[1] == compiled[1]
    for name, grad in eager[2].items():
        torch.testing.assert_close(compiled[2][name], grad, atol=1e-4, rtol=1e-3, msg=name)
