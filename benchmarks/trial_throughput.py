"""Trial throughput: the tutorial loop, autodrop's trial loop, and packed trials, in one run.

Same network (autodrop's simple-cnn with every drop site at 0.1), same images (scikit-learn's
digits at 32x32, written out as PNG files), same epochs, batch size 128, Adam at 2e-3:

(a) the tutorial loop, as Optuna's PyTorch example writes it: torchvision ImageFolder +
    DataLoader over the image files (decoded every epoch), nn.Dropout, validation under no_grad;
(b) autodrop's trial loop (autodrop.training.loop.train_trial) on the same folder, decoded once;
(c) several trials at once as one packed model (autodrop.packed.PackTrainer), in trial-images/s;
(b+) and (c+): (b) and (c) with the realistic recipe: flip and crop augmentation on the device,
    a cosine schedule and weight decay 5e-4 (``--augment flip,crop --lr-schedule cosine
    --weight-decay 5e-4``). The recipe's cost is (b+) against (b), measured in the same run;
(d) (b) in bf16 autocast (``--precision bf16``), where the CPU computes bf16 natively (AMX or
    AVX512-BF16; ``--bf16 yes`` measures it on any CPU, where it is emulated and slow).

Rows (b) to (c+) train in float32 on a CPU and as ``--precision auto`` picks on a GPU (bf16 where
it has it); each row names its precision, and the CPU's capability as PyTorch reports it is printed.

An "epoch" is one pass over the training images plus one evaluation of the validation images, in
every loop; images/s is training images per second of that. Each figure is the median of
``--repeats`` interleaved runs, after one warm-up run of each loop. The FLOP rate counts the
convolutions and linear layers (training = 3x forward) against the device's measured matmul rate.

Results and the machine they came from: benchmarks/README.md.
Usage: python benchmarks/trial_throughput.py [--size N] [--device auto|cpu|cuda] [--epochs E] [--bf16 auto|yes|no]
The last line printed is ``speedup vs tutorial loop: R.RRx`` ((b) over (a), images/s); the one
before it ``realistic recipe vs plain loop: R.RRx`` ((b+) over (b)).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autodrop.config import DataConfig, TrainConfig  # noqa: E402
from autodrop.nets.build import ModelShape, build_model  # noqa: E402
from autodrop.nets.sites import DropSite, apply_placement, site_kinds  # noqa: E402
from autodrop.training.data import ImageData, load_data, place_data  # noqa: E402
from autodrop.training.device import (  # noqa: E402
    cpu_capabilities,
    native_bf16,
    resolve_device,
    resolve_precision,
)
from autodrop.training.loop import Member, train_trial  # noqa: E402
from autodrop.training.normaliser import Normaliser  # noqa: E402
from autodrop.training.packed import PackTrainer, auto_pack_size  # noqa: E402

MODEL = "simple-cnn"
RATE = 0.1  # every site on at this rate: the "everywhere-low" baseline, the most dropout work
BATCH_SIZE = 128
LR = 2e-3
PLAIN = TrainConfig(batch_size=BATCH_SIZE, lr=LR)
REALISTIC = TrainConfig(batch_size=BATCH_SIZE, lr=LR, augment=("flip", "crop"), lr_schedule="cosine", weight_decay=5e-4)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1437, help="training images (digits has 1,437; more repeats them)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pack", type=int, default=None, help="members of the packed run (default: 8 on CUDA, 4 on CPU)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the tutorial loop (Optuna's example: 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--bf16", default="auto", choices=("auto", "yes", "no"),
                        help="measure (d), the loop in bf16: where the CPU has native bf16 (auto), always, or never")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    pack = args.pack or (auto_pack_size(device, 64) if device.type == "cuda" else 4)
    # float32 on a CPU, as every earlier figure; on a GPU what --precision auto picks, as a search would.
    precision = resolve_precision("auto", device) if device.type == "cuda" else "fp32"
    plain, realistic = replace(PLAIN, precision=precision), replace(REALISTIC, precision=precision)
    native = native_bf16(device)
    with_bf16 = device.type == "cpu" and (args.bf16 == "yes" or (args.bf16 == "auto" and native))
    torch.manual_seed(0)

    digits = load_data(DataConfig(source="digits", image_size=args.image_size))
    data = _resize_train_set(digits, args.size)
    n_train, n_val = len(data.train_labels), len(data.val_labels)
    shape = ModelShape(data.channels, data.n_classes, data.image_size)
    print(f"device: {_describe(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    found = cpu_capabilities()
    print(f"cpu capability: {found['capability']}; native bf16: {'yes' if native_bf16(torch.device('cpu')) else 'no'} "
          f"(amx_bf16 {_yes(found.get('amx_bf16'))}, avx512_bf16 {_yes(found.get('avx512_bf16'))})")
    print(f"data: digits at {args.image_size}x{args.image_size}, {n_train} train / {n_val} val images; "
          f"model {MODEL}, every site at {RATE}; batch {BATCH_SIZE}; {args.epochs} epochs; "
          f"median of {args.repeats} repeats")

    with tempfile.TemporaryDirectory(prefix="autodrop-bench-") as tmp:
        folder = _write_pngs(data, Path(tmp) / "images")
        cache_dir = Path(tmp) / "cache"
        t0 = time.perf_counter()
        decoded = _load_folder(folder, args.image_size, cache_dir)
        decode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = _load_folder(folder, args.image_size, cache_dir)
        cached_s = time.perf_counter() - t0
        print(f"reading the folder into uint8 tensors: {decode_s:.2f} s decoding, {cached_s:.2f} s from the cache")
        on_device = place_data(decoded, device)  # on a CPU: the mapped cache file itself
        normaliser = Normaliser(decoded.train_images).to(device)

        runs: dict[str, Callable[[int], float]] = {
            "tutorial": lambda epochs: _tutorial(folder, shape, device, epochs, args.workers, normaliser),
            "autodrop": lambda epochs: _autodrop(on_device, normaliser, shape, device, epochs, plain),
            "recipe": lambda epochs: _autodrop(on_device, normaliser, shape, device, epochs, realistic),
            "packed": lambda epochs: _packed(on_device, normaliser, shape, device, epochs, pack, plain),
            "packed-recipe": lambda epochs: _packed(on_device, normaliser, shape, device, epochs, pack, realistic),
        }
        if with_bf16:
            bf16 = replace(plain, precision="bf16")
            runs["bf16"] = lambda epochs: _autodrop(on_device, normaliser, shape, device, epochs, bf16)
        for run in runs.values():  # warm-up: kernels chosen, caches and allocator primed
            run(1)
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                seconds[name].append(run(args.epochs))

    images = args.epochs * n_train
    rate = {name: images / statistics.median(s) for name, s in seconds.items()}
    for name in ("packed", "packed-recipe"):
        rate[name] *= pack  # trial-images: every member trains on every image
    flops_train, flops_eval = _flops_per_image(shape, device)
    epoch_flops = n_train * flops_train + n_val * flops_eval
    matmul = _matmul_rate(device)
    floor = matmul / (epoch_flops / n_train)

    print()
    print(f"{'loop':44s} {'precision':>9s} {'images/s':>10s} {'vs tutorial':>12s} {'GFLOP/s':>9s} {'of matmul':>10s}")
    labels = {
        "tutorial": "(a) tutorial loop (ImageFolder + DataLoader)",
        "autodrop": "(b) autodrop trial loop",
        "recipe": "(b+) the same, realistic recipe",
        "packed": f"(c) {pack} trials packed (trial-images/s)",
        "packed-recipe": "(c+) the same, realistic recipe",
        "bf16": "(d) autodrop trial loop in bf16" + ("" if native else " (emulated)"),
    }
    precisions = {name: precision for name in labels} | {"tutorial": "fp32", "bf16": "bf16"}
    for name, label in labels.items():
        if name not in rate:
            continue
        achieved = rate[name] * epoch_flops / n_train
        print(f"{label:44s} {precisions[name]:>9s} {rate[name]:10,.0f} {rate[name] / rate['tutorial']:11.2f}x "
              f"{achieved / 1e9:9.1f} {100 * achieved / matmul:9.1f}%")
    if "bf16" in rate:
        print(f"bf16 vs {precision} trial loop: {rate['bf16'] / rate['autodrop']:.2f}x; bf16 vs tutorial loop: "
              f"{rate['bf16'] / rate['tutorial']:.2f}x")
    elif device.type == "cpu":
        print("(d) bf16 row left out: this CPU has no native bf16 (no AMX-BF16 or AVX512-BF16), where bf16 is "
              "emulated and slower than float32; --bf16 yes measures it anyway")
    spread = {name: f"{min(s):.2f}-{max(s):.2f}" for name, s in seconds.items()}
    print(f"seconds per run (min-max): {spread}")
    print(f"packed vs one trial: {rate['packed'] / rate['autodrop']:.2f}x; with the realistic recipe: "
          f"{rate['packed-recipe'] / rate['recipe']:.2f}x; packed recipe vs packed plain: "
          f"{rate['packed-recipe'] / rate['packed']:.2f}x")
    print(f"model: {flops_train / 1e6:.1f} MFLOP per training image, {flops_eval / 1e6:.1f} per evaluated image")
    print(f"device matmul rate: {matmul / 1e9:,.0f} GFLOP/s ({_matmul_dtype(device)}); arithmetic floor "
          f"{floor:,.0f} images/s; autodrop loop reaches {100 * rate['autodrop'] / floor:.0f}% of it")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    line = f"peak RSS {peak_rss:,.0f} MiB"
    if device.type == "cuda":
        line += f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB"
    print(line)
    print(f"realistic recipe vs plain loop: {rate['recipe'] / rate['autodrop']:.2f}x")
    print(f"speedup vs tutorial loop: {rate['autodrop'] / rate['tutorial']:.2f}x")


def _resize_train_set(data: ImageData, size: int) -> ImageData:
    """Return ``data`` with ``size`` training images (the first ones, or the set repeated)."""
    index = torch.arange(size) % len(data.train_labels)
    return replace(data, train_images=data.train_images[index], train_labels=data.train_labels[index])


def _write_pngs(data: ImageData, root: Path) -> Path:
    from PIL import Image

    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("val", data.val_images, data.val_labels)):
        for c in data.classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            Image.fromarray(image[0].numpy(), "L").save(root / split / data.classes[label] / f"{i}.png")
    return root


def _load_folder(folder: Path, image_size: int, cache_dir: Path) -> ImageData:
    import os

    old = os.environ.get("AUTODROP_CACHE_DIR")
    os.environ["AUTODROP_CACHE_DIR"] = str(cache_dir)
    try:
        return load_data(DataConfig(source=str(folder), image_size=image_size))
    finally:
        if old is None:
            del os.environ["AUTODROP_CACHE_DIR"]
        else:
            os.environ["AUTODROP_CACHE_DIR"] = old


def _autodrop_model(shape: ModelShape, seed: int = 0, rates: dict[str, float] | None = None) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(MODEL, shape)
    apply_placement(model, rates or {site: RATE for site in site_kinds(model)})
    return model


def _tutorial_model(shape: ModelShape) -> nn.Module:
    """The same network as a user would write it: nn.Dropout where autodrop has a drop site."""
    model = _autodrop_model(shape)
    for name, module in list(model.named_children()):
        if isinstance(module, DropSite):
            setattr(model, name, nn.Dropout(module.p) if module.p else nn.Identity())
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _tutorial(folder: Path, shape: ModelShape, device: torch.device, epochs: int, workers: int,
              normaliser: Normaliser) -> float:
    """Optuna's PyTorch example, over image files: returns seconds for ``epochs`` epochs."""
    from torchvision import datasets, transforms

    mean = (-normaliser.shift / normaliser.scale).flatten().tolist()
    std = (1 / normaliser.scale).flatten().tolist()
    transform = transforms.Compose([
        transforms.Grayscale(num_output_channels=shape.channels),
        transforms.Resize((shape.image_size, shape.image_size)),
        transforms.ToTensor(),
        transforms.Normalize([m / 255 for m in mean], [s / 255 for s in std]),
    ])
    model = _tutorial_model(shape).to(device)
    _sync(device)
    start = time.perf_counter()
    train_loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder / "train"), transform), batch_size=BATCH_SIZE, shuffle=True, num_workers=workers
    )
    valid_loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(folder / "val"), transform), batch_size=BATCH_SIZE, shuffle=True, num_workers=workers
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(epochs):
        model.train()
        for data, target in train_loader:
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            output = model(data)
            loss = F.cross_entropy(output, target)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for data, target in valid_loader:
                data, target = data.to(device), target.to(device)
                output = model(data)
                pred = output.argmax(dim=1, keepdim=True)
                correct += pred.eq(target.view_as(pred)).sum().item()
        _ = correct / len(valid_loader.dataset)
    _sync(device)
    return time.perf_counter() - start


def _autodrop(data: ImageData, normaliser: Normaliser, shape: ModelShape, device: torch.device, epochs: int,
              recipe: TrainConfig) -> float:
    """autodrop's trial loop: seconds from the call to the last epoch's validation figures."""
    model = _autodrop_model(shape)
    ends: list[float] = []
    start = time.perf_counter()
    # on_epoch runs after the epoch's validation figures are read back (a device sync).
    train_trial(model, data, normaliser, replace(recipe, epochs=epochs), seed=0,
                device=device, on_epoch=lambda m: ends.append(time.perf_counter()))
    return ends[-1] - start  # the final train-set evaluation is left out: the tutorial loop has none


def _packed(data: ImageData, normaliser: Normaliser, shape: ModelShape, device: torch.device, epochs: int,
            pack: int, recipe: TrainConfig) -> float:
    """``pack`` trials at once, each with its own rates: seconds for ``epochs`` epochs of all of them."""
    members = []
    for k in range(pack):
        rates = {site: RATE * (1 + k % 3) for site in site_kinds(build_model(MODEL, shape))}
        members.append(Member(k, _autodrop_model(shape, seed=k, rates=rates), seed=k))
    trainer = PackTrainer(data, normaliser, replace(recipe, epochs=epochs), device=device,
                          seed=0, build=lambda: build_model(MODEL, shape))
    _sync(device)
    start = time.perf_counter()
    trainer.set_members(members)
    for _ in range(epochs):
        trainer.epoch_metrics(trainer.train_epoch())  # reads the figures back: synchronises
    return time.perf_counter() - start


def _flops_per_image(shape: ModelShape, device: torch.device) -> tuple[float, float]:
    """Return (training, evaluation) FLOPs per image: 2 x multiply-adds of convs and linears; training 3x."""
    model = build_model(MODEL, shape).eval()
    macs = 0

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            macs += output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, shape.channels, shape.image_size, shape.image_size))
    for h in hooks:
        h.remove()
    forward = 2.0 * macs
    return 3.0 * forward, forward


def _yes(value: object) -> str:
    return "yes" if value else "no"


def _matmul_dtype(device: torch.device) -> str:
    return "bf16, as the loop's autocast" if device.type == "cuda" else "float32"


def _matmul_rate(device: torch.device) -> float:
    """Return the best FLOP/s of a large square matmul on ``device`` (bf16 on CUDA, float32 on CPU)."""
    n = 8192 if device.type == "cuda" else 2048
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        _sync(device)
        start = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / (4 if device.type == "cuda" else 1))
    return 2.0 * n**3 / best


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {_cpu_model()})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown model"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
