"""benchmark.py: how fast is a pretraining step, and where does the time go?

    python benchmark.py                        # the default CPU config of pretrain.py
    python benchmark.py --batch-size 256 --image-size 256 --width 32 --compile   # on a GPU

Measured over --steps timed steps after --warmup untimed ones, on the current device:
  matmul      the device's matrix-multiply FLOP/s (square float32 on a CPU, bfloat16 on CUDA);
  model       forward + backward + SGD step of the encoder and head on one ready batch of 2B views:
              slices per second (B per step) and FLOP/s (FLOPs counted by torch's FlopCounterMode);
  full step   what pretrain.py does per step: read the batch from the memory-mapped cache, move it
              to the device, augment two views on the device, forward, loss, backward, step;
  overhead    model / full-step slices per second: the cost of input pipeline, augmentation and loss;
  per-sample  the same step fed like the authors' code: each slice augmented on its own, on the
              CPU, in DataLoader worker processes; speed-up = full step / per-sample;
  memory      peak resident host memory; on CUDA also the peak allocated device memory.
"""
import argparse
import json
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import pretrain
from augment import PRETRAIN, augment, epoch_generator
from losses import contrastive_loss, positive_mask
from runs import pick_device


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Time the pretraining step.")
    p.add_argument("--method", default="pcl", choices=("simclr", "gcl", "pcl"))
    p.add_argument("--data", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--amp", default="auto", choices=("auto", "off", "bf16", "fp16"))
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--skip-per-sample", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, steps, warmup, device):
    """Seconds per call of step(), after warmup calls."""
    for _ in range(warmup):
        step()
    sync(device)
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - tic) / steps


def matmul_flops(device):
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10, 3, device)


class PerSampleViews(torch.utils.data.Dataset):
    """The authors' input pipeline: every slice augmented on its own, on the CPU, in a worker."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample = self.dataset[i]
        x = sample["image"][None]  # (1, 1, S, S)
        generator = torch.Generator().manual_seed(i)
        return augment(x, PRETRAIN, generator)[0], augment(x, PRETRAIN, generator)[0], sample["position"]


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    config = vars(pretrain.get_args(["--method", args.method, "--width", str(args.width),
                                     "--image-size", str(args.image_size)]))
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    net = pretrain.build_model(config).to(device, memory_format=memory_format)
    model = torch.compile(net) if args.compile else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    train_args = argparse.Namespace(**config)
    amp = pretrain.amp_context(device, args.amp)
    B = args.batch_size

    cache = data.open_dataset(args.data, args.image_size)
    dataset = data.SliceDataset(cache)
    loader = data.make_loader(dataset, B, seed=0)
    batches = iter(())

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    def optimize(loss):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # the model alone, on one ready batch of 2B views
    views = torch.randn(2 * B, 1, args.image_size, args.image_size, device=device)  # (2B, 1, S, S)
    ready_positions = torch.rand(B, device=device).clamp_min(1e-3)  # (B,)

    def model_step(model=model):
        with amp:
            z1, z2 = model(views).chunk(2)  # (B, D) each
            mask = positive_mask(args.method, ready_positions, config["partitions"], config["threshold"])
            optimize(contrastive_loss(torch.cat([z1, z2]), mask, config["tau"]))

    with FlopCounterMode(display=False) as counter:
        model_step(net)  # counted on the plain model: a compiled one hides its operations
    flops_per_step = counter.get_total_flops()

    # the full step of pretrain.py
    generator = epoch_generator(device, 0, 0)

    def full_step():
        batch = next_batch()
        x = batch["image"].to(device, non_blocking=True)  # (B, 1, S, S)
        positions = batch["position"].to(device, non_blocking=True)  # (B,)
        with amp:
            loss, _ = pretrain.pretext_loss(model, x, positions, generator, train_args)
        optimize(loss)

    results = {"device": str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
               "threads": torch.get_num_threads(), "config": vars(args)}
    results["matmul_flops"] = matmul_flops(device)
    model_seconds = timed(model_step, args.steps, args.warmup, device)
    results["model_slices_per_s"] = B / model_seconds
    results["model_flops"] = flops_per_step / model_seconds
    results["full_slices_per_s"] = B / timed(full_step, args.steps, args.warmup, device)
    results["overhead_ratio"] = results["model_slices_per_s"] / results["full_slices_per_s"]

    if not args.skip_per_sample:
        per_sample = torch.utils.data.DataLoader(
            PerSampleViews(dataset), batch_size=B, shuffle=True, drop_last=True, num_workers=args.workers,
            persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
        samples = iter(())

        def per_sample_step():
            nonlocal samples
            try:
                v1, v2, positions = next(samples)
            except StopIteration:
                samples = iter(per_sample)
                v1, v2, positions = next(samples)
            x = torch.cat([v1, v2]).to(device, non_blocking=True)  # (2B, 1, S, S)
            with amp:
                z1, z2 = model(x).chunk(2)
                mask = positive_mask(args.method, positions.to(device), config["partitions"], config["threshold"])
                optimize(contrastive_loss(torch.cat([z1, z2]), mask, config["tau"]))

        results["per_sample_slices_per_s"] = B / timed(per_sample_step, args.steps, args.warmup, device)
        results["speedup_over_per_sample"] = results["full_slices_per_s"] / results["per_sample_slices_per_s"]
    results["peak_host_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        results["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20

    print(f"device {results['device']}, {results['threads']} threads; method {args.method}, batch {B}, "
          f"image {args.image_size}, width {args.width}, channels_last {not args.no_channels_last}, "
          f"compile {args.compile}, amp {args.amp}")
    print(f"  matmul               {results['matmul_flops'] / 1e9:10.1f} GFLOP/s")
    print(f"  model alone          {results['model_slices_per_s']:10.1f} slices/s  "
          f"{results['model_flops'] / 1e9:.1f} GFLOP/s ({100 * results['model_flops'] / results['matmul_flops']:.0f}% of matmul)")
    print(f"  full step            {results['full_slices_per_s']:10.1f} slices/s")
    print(f"  overhead ratio       {results['overhead_ratio']:10.3f}  (model alone / full step)")
    if "per_sample_slices_per_s" in results:
        print(f"  per-sample pipeline  {results['per_sample_slices_per_s']:10.1f} slices/s "
              f"({args.workers} workers); full step is {results['speedup_over_per_sample']:.2f}x faster")
    print(f"  peak host memory     {results['peak_host_memory_mb']:10.0f} MB")
    if "peak_device_memory_mb" in results:
        print(f"  peak device memory   {results['peak_device_memory_mb']:10.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
