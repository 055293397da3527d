"""benchmark.py: how fast is a pretraining step, and where does the time go?

    python benchmark.py                        # the default CPU config of pretrain.py
    python benchmark.py --batch-size 32 --image-size 512 --width 32 --compile      # on a GPU
    python benchmark.py --suite gpu --json results/benchmark-gpu.json                # the README's GPU table

Measured over --steps timed steps after --warmup untimed ones, on the current device:
  matmul      the device's matrix-multiply FLOP/s (square float32 on a CPU, bfloat16 on CUDA): the peak;
  loader      slices per second the loader alone serves from the memory-mapped cache (pinned on CUDA);
  model       forward + backward + SGD step of the encoder and head on one ready batch of 2B views and
              its loss: slices per second (B per step), FLOP/s (counted by torch's FlopCounterMode) and
              MFU, the model's FLOP/s over the matmul peak;
  full step   what pretrain.py does per step, with losses.contrastive_step: a batch from the loader
              to the device, two augmented views, forward, loss, backward, SGD step, the loss summed
              on the device (--read-every-step also reads it every step, as the loop once did);
  overhead    model / full-step slices per second: the cost of the input pipeline, augmentation and loss;
  per-sample  the same step fed like the authors' code: each slice augmented on its own, on the CPU,
              in DataLoader worker processes; speed-up = full step / per-sample;
  CHD         the time the paper's CHD pretraining (300 epochs of 17,000 slices) takes at the full step;
  checkpoint  a save between epochs (checkpoints.Run.save): the milliseconds it holds the loop (the copy to host
              memory) and those of the whole write, which a background thread does while training goes on;
  memory      peak resident host memory; on CUDA also the peak allocated device memory.
--suite NAME runs the configurations of SUITES[NAME] one after the other and ends with their table.
"""
import resource
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import data
from augment import AUGMENTATIONS, augment, epoch_generator
from checkpoints import Run, save_json
from losses import contrastive_loss, contrastive_step, positives_of
from model import build_pretrainer
from runs import AMP_MODES, COMPILE_MODES, Parser, amp_context, check_writable, cli, cosine_schedule, grad_scaler
from runs import RunError, image_size, non_negative, pick_device, positive

CHD_SLICES, CHD_EPOCHS = 17_000, 300
SUITES = {  # the README's tables; eager rows first (the baselines; cheap), so a run cut short keeps them
    "gpu": ["--batch-size 32 --image-size 256 --width 32",  # pretrain.py's default on CUDA
            "--batch-size 32 --image-size 512 --width 32 --read-every-step",  # as the loop was before
            "--batch-size 32 --image-size 512 --width 32",  # the paper's CHD size
            "--batch-size 256 --image-size 256 --width 32",
            "--batch-size 32 --image-size 512 --width 32 --augment paper",  # the real-data presets' augmentation
            "--batch-size 32 --image-size 512 --width 32 --compile",
            "--batch-size 256 --image-size 256 --width 32 --compile",
            "--batch-size 32 --image-size 512 --width 32 --compile reduce-overhead",
            "--batch-size 256 --image-size 256 --width 32 --compile reduce-overhead"],
    "cpu": ["--threads 2", "--threads 2 --augment paper", "--threads 2 --image-size 128"],  # pretrain.py's CPU default first
}


def get_args(argv=None):
    p = Parser(description="Time the pretraining step.")
    p.add_argument("--method", default="pcl", choices=("simclr", "gcl", "pcl"))
    p.add_argument("--data", default=None)
    p.add_argument("--batch-size", type=positive(int), default=32)
    p.add_argument("--image-size", type=image_size, default=64)
    p.add_argument("--width", type=positive(int), default=16)
    p.add_argument("--augment", default="upright", choices=list(AUGMENTATIONS))
    p.add_argument("--steps", type=positive(int), default=20)
    p.add_argument("--warmup", type=non_negative(int), default=5)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-channels-last", action="store_true", help="keep the NCHW memory format")
    p.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   help="torch.compile the model (alone: mode default; reduce-overhead adds CUDA graphs)")
    p.add_argument("--read-every-step", action="store_true", help="full step: read the loss every step (a host sync)")
    p.add_argument("--amp", default="auto", choices=AMP_MODES)
    p.add_argument("--loader-workers", type=non_negative(int), default=None, help="full step's (default: 0 CPU, 4 CUDA)")
    p.add_argument("--workers", type=non_negative(int), default=2, help="DataLoader workers of the per-sample pipeline")
    p.add_argument("--skip-per-sample", action="store_true")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--suite", default=None, choices=list(SUITES), help="run these configurations (and the flags given)")
    args = p.parse_args(argv)
    if args.batch_size < 2:
        p.error("--batch-size 1: a contrastive batch needs other slices, and BatchNorm more than one value")
    if args.json:
        check_writable(args.json, "--json", folder=False, suffix=".json")  # before minutes of timing
    return args


def timed(step, steps, warmup, device):
    """Seconds per call of step(), after warmup calls; the device is waited for only at the ends."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def matmul_flops(device):
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, 10, 3, device)


class PerSampleViews(torch.utils.data.Dataset):
    """The authors' input pipeline: each slice augmented twice on its own, on the CPU, in a worker."""

    def __init__(self, dataset, views):
        self.dataset, self.views = dataset, views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        sample, generator = self.dataset[i], torch.Generator().manual_seed(i)
        x = sample["image"][None].float()  # (1, 1, S, S)
        return augment(x, self.views, generator)[0], augment(x, self.views, generator)[0], sample["position"]


def batches(loader):
    """The loader's batches, epoch after epoch."""
    while True:
        yield from loader


def checkpoint_ms(net, optimizer, scaler, repeats=3):
    """(ms a save holds the training loop, ms of the whole write), the fastest of a few saves."""
    with tempfile.TemporaryDirectory() as folder:
        run, scheduler, held, whole = Run(folder, "pretrain", {}, ["epoch"]), cosine_schedule(optimizer, 1), [], []
        for _ in range(repeats):
            tic = time.perf_counter()
            run.save(1, net, optimizer, scheduler, scaler)
            held.append(time.perf_counter() - tic)
            run.wait()
            whole.append(time.perf_counter() - tic)
    return 1e3 * min(held), 1e3 * min(whole)


def report(results, args):
    """Print the figures of main()."""
    print(f"device {results['device']}, {results['threads']} threads, torch {torch.__version__}; method {args.method}, "
          f"batch {args.batch_size}, image {args.image_size}, width {args.width}, channels_last {not args.no_channels_last}, "
          f"compile {args.compile}, amp {args.amp}, read every step {args.read_every_step}")
    print(f"  matmul (the peak)    {results['matmul_flops'] / 1e9:10.1f} GFLOP/s")
    print(f"  loader alone         {results['loader_slices_per_s']:10.1f} slices/s ({results['loader_workers']} workers)")
    print(f"  model alone          {results['model_slices_per_s']:10.1f} slices/s  {results['model_flops'] / 1e9:.1f} "
          f"GFLOP/s, MFU {100 * results['mfu']:.0f}%")
    print(f"  full step            {results['full_slices_per_s']:10.1f} slices/s")
    print(f"  overhead ratio       {results['overhead_ratio']:10.3f}  (model alone / full step)")
    if "per_sample_slices_per_s" in results:
        print(f"  per-sample pipeline  {results['per_sample_slices_per_s']:10.1f} slices/s ({args.workers} workers); "
              f"full step is {results['speedup_over_per_sample']:.2f}x faster")
    print(f"  CHD pretraining      {results['chd_pretraining_hours']:10.1f} hours ({CHD_EPOCHS} epochs of "
          f"{CHD_SLICES:,} slices at this size)")
    print(f"  checkpoint save      {results['save_held_ms']:10.1f} ms holding the loop, of {results['save_ms']:.1f} ms "
          f"written in the background")
    print(f"  peak host memory     {results['peak_host_memory_mb']:10.0f} MB")
    if "peak_device_memory_mb" in results:
        print(f"  peak device memory   {results['peak_device_memory_mb']:10.0f} MB")


def measure(args):
    """The figures of one configuration: a dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda, B, S = device.type == "cuda", args.batch_size, args.image_size
    torch.backends.cudnn.benchmark = cuda  # as pretrain.py
    config = dict(width=args.width, proj_dim=128, bottleneck="batchnorm", init="default")
    memory_format = torch.contiguous_format if args.no_channels_last else torch.channels_last
    net = build_pretrainer(config).to(device, memory_format=memory_format)
    model = torch.compile(net, mode=args.compile) if args.compile else net
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = grad_scaler(device, args.amp)  # as pretrain.py: loss scaling under fp16, else nothing
    positives = positives_of(args.method)  # pretrain.py's defaults: threshold 0.1, 4 balanced partitions
    views = AUGMENTATIONS[args.augment]

    def optimize(loss):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    # the model alone, on one ready batch of 2B views
    ready = torch.randn(2 * B, 1, S, S, device=device)  # (2B, 1, S, S)
    ready_positions = torch.rand(B, device=device).clamp_min(1e-3)  # (B,)

    def model_step(model=model):
        with amp_context(device, args.amp):
            z = model(ready)  # (2B, D)
            loss = contrastive_loss(z, positives(ready_positions, None), 0.1)
        optimize(loss)  # outside autocast, as in pretrain.py

    with FlopCounterMode(display=False) as counter:
        model_step(net)  # counted on the plain model: a compiled one hides its operations
    flops_per_step = counter.get_total_flops()

    # the loader alone, then the full step of pretrain.py's loop around its contrastive_step
    cache = data.open_dataset(args.data or "synthetic", S)
    dataset = data.SliceDataset(cache)
    workers = args.loader_workers if args.loader_workers is not None else (4 if cuda else 0)
    loader, _ = data.make_loader(dataset, B, workers=workers, pin_memory=cuda)
    if len(loader) == 0:  # no whole batch: batches() would wait forever
        raise RunError(f"{len(dataset)} slices of {cache.meta['data']} cannot fill one batch of {B}")
    stream, generator = batches(loader), epoch_generator(device, 0, 0)
    total = torch.zeros(2, device=device)  # the loop's sums of loss and pos_acc, kept on the device

    def full_step():
        batch = next(stream)
        x = batch["image"].to(device, non_blocking=True).float()  # (B, 1, S, S), float16 in the copy
        positions = batch["position"].to(device, non_blocking=True)  # (B,)
        slices = batch["slices"].to(device, non_blocking=True)  # (B,)
        with amp_context(device, args.amp):
            loss, acc = contrastive_step(model, x, positions, slices, generator, positives, views, 0.1)
        optimize(loss)
        total.add_(torch.stack([loss.detach(), acc]))
        if args.read_every_step:
            total.tolist()  # waits for the device

    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "threads": torch.get_num_threads(),
               "torch": torch.__version__, "config": vars(args), "matmul_flops": matmul_flops(device),
               "loader_workers": workers}
    results["loader_slices_per_s"] = B / timed(lambda: next(stream), args.steps, args.warmup, torch.device("cpu"))
    model_seconds = timed(model_step, args.steps, args.warmup, device)
    results["model_slices_per_s"] = B / model_seconds
    results["model_flops"] = flops_per_step / model_seconds
    results["mfu"] = results["model_flops"] / results["matmul_flops"]
    results["full_slices_per_s"] = B / timed(full_step, args.steps, args.warmup, device)
    results["overhead_ratio"] = results["model_slices_per_s"] / results["full_slices_per_s"]
    results["chd_pretraining_hours"] = CHD_SLICES * CHD_EPOCHS / results["full_slices_per_s"] / 3600

    if not args.skip_per_sample:
        samples = batches(torch.utils.data.DataLoader(PerSampleViews(dataset, views), batch_size=B, shuffle=True,
                                                      drop_last=True, num_workers=args.workers, pin_memory=cuda))

        def per_sample_step():
            v1, v2, positions = next(samples)
            with amp_context(device, args.amp):
                z = model(torch.cat([v1, v2]).to(device, non_blocking=True))  # (2B, D)
                loss = contrastive_loss(z, positives(positions.to(device), None), 0.1)
            optimize(loss)

        results["per_sample_slices_per_s"] = B / timed(per_sample_step, args.steps, args.warmup, device)
        results["speedup_over_per_sample"] = results["full_slices_per_s"] / results["per_sample_slices_per_s"]
    results["save_held_ms"], results["save_ms"] = checkpoint_ms(net, optimizer, scaler)
    results["peak_host_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        results["peak_device_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return results


def table(rows):
    """The Markdown table of a suite: one line per configuration (or the error that stopped it)."""
    lines = ["| config | loader | model alone | full step | overhead | MFU | CHD hours | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for flags, r in rows:
        if "error" in r:
            lines.append(f"| {flags} | failed: {r['error']} | | | | | | {r['seconds']:.0f} |")
            continue
        lines.append(f"| {flags} | {r['loader_slices_per_s']:,.0f} | {r['model_slices_per_s']:,.0f} | "
                     f"{r['full_slices_per_s']:,.0f} | {r['overhead_ratio']:.2f} | {100 * r['mfu']:.0f}% | "
                     f"{r['chd_pretraining_hours']:.1f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    args = get_args(argv)
    if args.suite is None:
        results = measure(args)
        report(results, args)
        if args.json:
            save_json(args.json, results)
        return results
    given = list(sys.argv[1:] if argv is None else argv)  # a suite: each row is these flags, then its own
    given = [a for i, a in enumerate(given) if not a.startswith("--suite") and given[i - 1:i] != ["--suite"]]
    rows = []
    for i, flags in enumerate(SUITES[args.suite]):
        print(f"\nrow {i + 1}/{len(SUITES[args.suite])}: {flags}", flush=True)  # a run cut short shows where
        row, tic = get_args(given + flags.split() + ["--skip-per-sample"]), time.perf_counter()
        try:
            results = measure(row)
            report(results, row)
        except Exception as e:  # one failing row (a compile mode, memory) must not cost the others
            results = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
            print(f"{flags}: failed: {results['error']}")
        rows.append((flags, dict(results, seconds=time.perf_counter() - tic)))  # seconds: compiling included
        torch._dynamo.reset()  # each compiled row starts afresh
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if args.json:  # after every row: a run cut short keeps what it measured
            save_json(args.json, [dict(flags=f, **r) for f, r in rows])
    device = next((r["device"] for _, r in rows if "device" in r), "no device")
    print(f"\nsuite {args.suite} on {device}, torch {torch.__version__}:\n{table(rows)}")
    return rows


if __name__ == "__main__":
    cli(main)
