"""Two gloo processes on the CPU against one process on the same global batch."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
from losses import contrastive_loss, gcl_mask, pcl_mask, simclr_mask

REPO = Path(__file__).resolve().parents[1]
B, D_IN, D = 8, 6, 5  # global batch, input and embedding sizes
METHODS = ("simclr", "gcl", "pcl")


def problem():
    """A global batch: inputs of two views, positions, and a linear 'encoder' W."""
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(B, D_IN, generator=g), torch.randn(B, D_IN, generator=g)
    positions = torch.tensor([0.05, 0.12, 0.2, 0.26, 0.5, 0.55, 0.9, 1.0])  # straddles partitions
    return x1, x2, positions, torch.randn(D, D_IN, generator=g)


def loss_of(method, z1, z2, positions):
    mask = {"simclr": simclr_mask, "gcl": gcl_mask, "pcl": lambda p: pcl_mask(p, 0.1)}[method](positions)
    return contrastive_loss(torch.cat([z1, z2]), mask, tau=0.2)


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x1, x2, positions, W = problem()
    share = slice(rank * B // world, (rank + 1) * B // world)  # this process's part of the batch
    for method in METHODS:
        encoder = torch.nn.Linear(D_IN, D, bias=False)
        encoder.weight.data.copy_(W)
        model = distributed.wrap(encoder, torch.device("cpu"))  # DistributedDataParallel
        z1, z2 = model(x1[share]), model(x2[share])  # (B / world, D) each
        z1, z2, p = distributed.gather(z1), distributed.gather(z2), distributed.gather(positions[share])
        loss = loss_of(method, z1, z2, p)
        loss.backward()  # DistributedDataParallel averages the gradients of the processes
        torch.save({"loss": loss.detach(), "grad": encoder.weight.grad, "positions": p},
                   f"{out}/{method}-{rank}.pt")
    logged = torch.tensor([rank + 1.0, 10.0 * rank])
    torch.save([distributed.average(logged), logged], f"{out}/average-{rank}.pt")  # logged itself unchanged
    distributed.cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for method in METHODS:
        x1, x2, positions, W = problem()
        W.requires_grad_()
        loss = loss_of(method, x1 @ W.T, x2 @ W.T, positions)  # one process, whole batch
        loss.backward()
        for rank in range(2):
            got = torch.load(tmp_path / f"{method}-{rank}.pt", weights_only=True)
            assert torch.equal(got["positions"], positions)  # gathered in rank order
            torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got["grad"], W.grad, atol=1e-5, rtol=1e-5)
    for rank in range(2):  # what each process logs: the mean over processes of (1, 0) and (2, 10)
        mean, logged = torch.load(tmp_path / f"average-{rank}.pt", weights_only=True)
        assert torch.equal(mean, torch.tensor([1.5, 5.0]))
        assert torch.equal(logged, torch.tensor([rank + 1.0, 10.0 * rank]))


def test_gather_is_the_identity_in_one_process():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather(x) is x and distributed.world_size() == 1


def fake_group(monkeypatch, rank, backend="gloo"):
    """torch.distributed as rank `rank` of a group sees it, recording the calls that wait for the others."""
    calls = []
    for name, value in dict(is_initialized=lambda: True, get_rank=lambda: rank, get_backend=lambda: backend,
                            barrier=lambda: calls.append("barrier"),
                            destroy_process_group=lambda: calls.append("destroy")).items():
        monkeypatch.setattr(distributed.dist, name, value)
    return calls


def test_rank_0_builds_first_and_the_others_after_it(monkeypatch):
    for rank, expected in ((0, ["build", "barrier"]), (1, ["barrier", "build"])):
        calls = fake_group(monkeypatch, rank)
        assert distributed.rank0_first(lambda: calls.append("build") or "built") == "built" and calls == expected


def test_cleanup_waits_for_every_process_and_leaves_only_an_nccl_group(monkeypatch):
    for backend, expected in (("gloo", ["barrier"]), ("nccl", ["barrier", "destroy"])):
        calls = fake_group(monkeypatch, 1, backend)
        distributed.cleanup()
        assert calls == expected


def test_torchrun_pretraining_with_two_processes(tmp_path):
    """pretrain.py under torchrun: both ranks train, rank 0 alone writes the run."""
    from synthetic import write_synthetic
    write_synthetic(tmp_path / "data", patients=6, style="mri", seed=5)
    env = dict(os.environ, OMP_NUM_THREADS="1", PCL_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               f"--master_port={free_port()}", "pretrain.py", "--data", str(tmp_path / "data"),
               "--epochs", "2", "--batch-size", "8", "--image-size", "32", "--width", "4",
               "--out", str(tmp_path / "run")]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3  # a header and two epochs: one writer
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["world_size"] == 2
    assert not any(k.startswith("module.") for k in state["model"])  # the plain model, not the DDP wrapper
    assert result.stdout.count("epoch   1/2") == 1  # only rank 0 prints


def test_torchrun_finetuning_divides_its_batch_and_resumes_only_with_as_many_processes(tmp_path):
    """finetune.py under torchrun: a global batch that two processes cannot share is one line; a run of two
    processes trains, and resuming it in one process is refused (its steps per epoch, so its schedule, differ)."""
    from synthetic import write_synthetic
    write_synthetic(tmp_path / "data", patients=6, style="mri", seed=5)
    env = dict(os.environ, OMP_NUM_THREADS="1", PCL_CACHE=str(tmp_path / "cache"))
    flags = ["finetune.py", "--pretrained", "none", "--data", str(tmp_path / "data"), "--patients", "2", "--folds",
             "3", "--val", "1", "--epochs", "2", "--image-size", "32", "--width", "4", "--out", str(tmp_path / "run")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    odd = subprocess.run(torchrun + flags + ["--batch-size", "3"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert odd.returncode != 0 and "error: --batch-size 3 (global) must divide among 2 processes" in odd.stderr
    assert not (tmp_path / "cache").exists()  # refused before the dataset was read
    ran = subprocess.run(torchrun + flags + ["--batch-size", "4", "--stop-after", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["config"]["world_size"] == 2
    alone = subprocess.run([sys.executable, *flags, "--batch-size", "4", "--resume"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 1 and "cannot resume with other settings (processes 2 -> 1)" in alone.stderr, alone.stderr
