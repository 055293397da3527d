"""distributed.py: training in several processes, one per GPU (or CPU process), with torchrun.

    torchrun --nproc_per_node=4 pretrain.py --method pcl --data DIR --batch-size 256

torchrun starts one process per GPU and sets RANK, LOCAL_RANK and WORLD_SIZE; without it there is
one process and everything here does nothing. Each process reads its own share of every global
batch (DistributedSampler), DistributedDataParallel averages the gradients, SyncBatchNorm computes
batch statistics over the global batch (CUDA only: torch's SyncBatchNorm has no CPU kernel, so CPU
processes keep their own statistics), and only rank 0 writes logs and checkpoints.

The contrastive losses need every embedding of the global batch: `gather` concatenates the
embeddings of all processes, with a backward that passes each process the gradient of its own
rows, so every anchor is contrasted with the whole global batch exactly as in one process.
"""
import os

import torch
import torch.distributed as dist


def setup(device_name="auto"):
    """Join the process group when started by torchrun. Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if world == 1:
        return 0, 1, None
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # no oversubscription
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), world, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def cleanup():
    """Wait for every process, then leave the group. With gloo (CPU) the group is left to the end of
    the process: destroying it aborted a process about once in 12 runs here (torch 2.13)."""
    if dist.is_initialized():
        dist.barrier()
        if dist.get_backend() == "nccl":
            dist.destroy_process_group()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def average(x):
    """The mean of tensor x over the processes (x itself in one process): what every process logs."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)  # sum over processes
    return x / dist.get_world_size()


def rank0_first(build):
    """build() on rank 0 first, then on the other processes: rank 0 writes what the others read
    (the preprocessing cache)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        dist.barrier()
    result = build()
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()
    return result


class _Gather(torch.autograd.Function):
    """all_gather whose backward returns each process the gradient of its own rows.

    Every process computes the same loss L of the gathered (world * B, D) tensor. The gradient of
    L with respect to process r's rows is the sum over processes of their (identical) gradients of
    those rows; DistributedDataParallel then divides by world_size when it averages parameter
    gradients, so the result equals the gradient of L in a single process."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (world * B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over processes
        B = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * B:(dist.get_rank() + 1) * B]  # (B, ...): this process's rows


def gather(x):
    """Concatenate x (B, ...) of every process in rank order: (world * B, ...); x itself in one process."""
    if world_size() == 1:
        return x
    if not x.requires_grad:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)
    return _Gather.apply(x)


def wrap(model, device):
    """DistributedDataParallel (with SyncBatchNorm on CUDA) when there are several processes."""
    if world_size() == 1:
        return model
    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return torch.nn.parallel.DistributedDataParallel(model)
