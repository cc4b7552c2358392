"""Image classification training for the paper's experiments (§4.2–4.4, Appendix B): CIFAR-10 with
ResNet-34-DS and ImageNet with MobileNetV2, both without batch norm and spectrally normalized.

The engine behind ``scripts/train_classifier.py`` and ``scripts/time_classifier.py`` (the Table 1 grid of
``scripts/sweep_cifar_grid.py`` is :mod:`invseg.experiments.cifar_grid`, a driver of this trainer):

* **Config** -- :class:`ClassifyConfig` (``data``, ``model``, ``train``, ``output``), typed dataclasses
  loaded from YAML with :func:`invseg.config.load_config` (``--set key=value``). Every setting of the
  paper's Tables 3–6 is a field: SGD momentum, learning rate, milestones (in epochs), ``gamma``, epochs,
  the **global** batch size, ``K``, ``eps``, hard/soft scaling and ``s_init``.
* **Data** (:func:`build_classification_data`): ``cifar10`` reads the official
  ``cifar-10-batches-py`` pickles, ``imagenet`` the ``train/`` and ``val/`` class folders, with the
  paper's augmentation; ``synthetic_cifar10`` / ``synthetic_imagenet`` first write a tiny dataset in
  the same on-disk format (rank 0, then a barrier) and then read it through the *same* loaders.
* **Training** (:func:`train_classifier`): cross entropy, SGD, ``MultiStepLR`` stepped once per epoch,
  fp32/bf16/fp16 autocast with a grad scaler, spectral state updated once per optimizer step after
  ``optimizer.step()`` (:class:`invseg.layers.SpectralUpdater`, DESIGN §1f), top-1/top-5 evaluation on
  the test (CIFAR) / val (ImageNet) split after every epoch, tqdm bar on rank 0, ``metrics.jsonl`` /
  ``metrics.png`` / ``summary.json`` and ``last.pt`` / ``best.pt`` (best top-1) in the run folder
  (:class:`invseg.train.TrainingRun`), DDP under ``torchrun``.
* **Global batch.** ``train.batch_size`` is the batch of one optimizer step over all processes (the
  paper's 128 on two GPUs is 64 per GPU); each process loads ``batch_size / world_size`` images, which
  must divide evenly.
* **Exact resume.** The training order and every image's augmentation depend only on
  ``(train.seed, epoch, position)`` (:class:`invseg.train.runner.ResumableSampler` hands each item its
  own seed; the torchvision transforms run under that seed), not on worker processes or interruptions,
  and the checkpoint holds model (with spectral state), optimizer, scheduler, scaler and RNG states:
  a run resumed from ``last.pt`` (end of epoch, or mid-epoch with ``train.checkpoint_every``) continues
  the uninterrupted trajectory. This is why the training loader uses that sampler rather than
  ``make_loader(distributed=True)``'s ``DistributedSampler``, whose per-epoch shuffle is equally
  deterministic but whose worker augmentation seeds are not restored on resume.
* **Evaluation** is exact under DDP: each rank evaluates the strided shard ``rank::world_size`` of the
  test set (no padding, no duplicated images) and the counts are summed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from invseg.data import (
    CIFAR10Pickles,
    cifar10_transforms,
    imagenet_datasets,
    imagenet_transforms,
    make_loader,
    write_synthetic_cifar10,
    write_synthetic_imagenet,
)
from invseg.layers import SpectralUpdater
from invseg.train.amp import autocast_context, make_grad_scaler
from invseg.train.distributed import (
    DistributedContext,
    all_reduce_mean,
    barrier,
    init_distributed,
    seed_everything,
)
from invseg.train.runner import ResumableSampler, SeededItems, StepTimer, TrainingRun
from invseg.train.step import train_step

__all__ = [
    "ClassifyDataConfig",
    "ClassifyModelConfig",
    "ClassifyTrainConfig",
    "ClassifyOutputConfig",
    "ClassifyConfig",
    "check_classify_config",
    "build_classification_data",
    "build_classifier",
    "evaluate_classifier",
    "train_classifier",
]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class ClassifyDataConfig:
    """Dataset, location and loading."""

    dataset: Literal["cifar10", "imagenet", "synthetic_cifar10", "synthetic_imagenet"] = "synthetic_cifar10"  # what to read
    root: str = "data_cache/synthetic_cifar10"  # cifar10: holds cifar-10-batches-py/; imagenet: holds train/, val/; synthetic: written here
    num_workers: int = 0  # data-loader worker processes per process
    image_size: int = 224  # imagenet: crop side (train RandomResizedCrop, val CenterCrop); val resize = round(image_size * 256 / 224)
    synthetic_num_classes: int = 3  # synthetic_imagenet: class folders (synthetic_cifar10 always has 10)
    synthetic_train_per_class: int = 5  # synthetic: training images per class
    synthetic_val_per_class: int = 2  # synthetic: test/val images per class
    synthetic_jpeg_size: list[int] = field(default_factory=lambda: [72, 88])  # synthetic_imagenet: JPEG (height, width)
    synthetic_seed: int = 0  # seed of the synthetic images


#: Where the keys of the flat model section before issue 14 went (``method`` is now ``sn_method``).
_RENAMED_MODEL_KEYS = {**{key: f"kwargs.{key}" for key in ("K", "scaling", "s_init", "sn_mode", "eps",
                                                            "exact_pointwise", "width_mult", "dropout")},
                       "method": "kwargs.sn_method"}
#: What the trainer passes itself: the number of classes of the dataset.
CLASSIFY_PROVIDED = ("num_classes",)


@dataclass
class ClassifyModelConfig:
    """The network: a registered name and its constructor's keyword arguments (``{name, kwargs}``).

    ``name``: ``resnet34ds`` (:class:`invseg.nets.ResNet34DS`) or ``mobilenetv2``
    (:class:`invseg.nets.MobileNetV2`). ``kwargs``: that constructor's arguments except ``num_classes``
    (from the dataset), checked against its signature when the config is loaded -- e.g. ``K`` (paper: CIFAR
    1..10, ImageNet 10..40), ``scaling``, ``s_init`` (paper: 3; 0.5 for K = 30, 40 on ImageNet),
    ``sn_method`` (``"none"``: the timing baseline), ``sn_mode``, ``eps`` (paper: 0.01),
    ``exact_pointwise``, and for MobileNetV2 ``width_mult`` and ``dropout``. Missing ones take the
    constructor's defaults.
    """

    name: Literal["resnet34ds", "mobilenetv2"] = "resnet34ds"  # invseg.nets registry name
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor keyword arguments

    __config_renamed__ = _RENAMED_MODEL_KEYS

    def __config_check__(self, where: str, path: str) -> None:
        from invseg.nets import check_model_kwargs

        check_model_kwargs(self.name, self.kwargs, key=f"{path}.kwargs", where=where, provided=CLASSIFY_PROVIDED)


@dataclass
class ClassifyTrainConfig:
    """Optimization (SGD + multi-step schedule), precision and bookkeeping."""

    epochs: int = 300  # training epochs (paper: CIFAR 300, ImageNet 150)
    batch_size: int = 128  # GLOBAL batch per optimizer step, split evenly over the processes
    lr: float = 0.01  # SGD learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 0.0  # L2 weight decay (the paper lists none)
    milestones: list[int] = field(default_factory=lambda: [150, 250])  # epochs after which lr *= gamma
    gamma: float = 0.1  # learning-rate factor at each milestone
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast precision (fp16: CUDA only)
    seed: int = 0  # seed of initialization, order and augmentation
    device: Literal["auto", "cpu", "cuda"] = "auto"  # compute device
    sn_check_every: int = 1  # test the power method's stopping rule every n spectral updates (1 = paper)
    sn_search_every: int = 1  # DFT searches every n updates, certified bounds in between (1 = every step)
    max_steps_per_epoch: int | None = None  # cut every epoch after this many steps (smoke runs); null: full epochs
    max_eval_steps: int | None = None  # evaluate on at most this many batches per process; null: whole split
    eval_batch_size: int | None = None  # evaluation batch per process; null: the training batch per process
    log_every: int = 50  # log the training loss every this many steps
    checkpoint_every: int = 0  # extra mid-epoch checkpoints every this many steps (0: end of epoch only)
    progress: bool = True  # tqdm progress bar (rank 0)
    threads: int | None = None  # torch.set_num_threads in the script (shared CPUs); null: torch's default


@dataclass
class ClassifyOutputConfig:
    """Run folder and resume policy."""

    run_dir: str = "outputs/classify"  # config.yaml, last.pt, best.pt, metrics.jsonl/png, summary.json
    resume: str = "auto"  # "auto" (last.pt if present), "never", or a checkpoint path
    plot: bool = True  # redraw metrics.png after every epoch (else only at the end)


@dataclass
class ClassifyConfig:
    """A complete classification experiment (paper Appendix B)."""

    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)  # dataset
    model: ClassifyModelConfig = field(default_factory=ClassifyModelConfig)  # network
    train: ClassifyTrainConfig = field(default_factory=ClassifyTrainConfig)  # optimization
    output: ClassifyOutputConfig = field(default_factory=ClassifyOutputConfig)  # run folder


def _positive(key: str, value: float | int | None, allow_none: bool = False, strict: bool = True) -> None:
    if value is None and allow_none:
        return
    ok = value is not None and (value > 0 if strict else value >= 0)
    if not ok:
        raise ValueError(f"{key} must be {'>' if strict else '>='} 0{' or null' if allow_none else ''}, got {value!r}")


def check_classify_config(cfg: ClassifyConfig, world_size: int = 1) -> None:
    """Cross-field rules the types cannot express; ``ValueError`` naming the key and the rule.

    Args:
        cfg: The config.
        world_size: Number of processes; ``train.batch_size`` must be a multiple of it.
    """
    d, m, t = cfg.data, cfg.model, cfg.train
    for key, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size), ("train.lr", t.lr),
                       ("train.log_every", t.log_every), ("train.sn_check_every", t.sn_check_every),
                       ("train.sn_search_every", t.sn_search_every),
                       ("data.image_size", d.image_size), ("data.synthetic_num_classes", d.synthetic_num_classes),
                       ("data.synthetic_train_per_class", d.synthetic_train_per_class),
                       ("data.synthetic_val_per_class", d.synthetic_val_per_class)):
        _positive(key, value)
    for key, value in (("train.momentum", t.momentum), ("train.weight_decay", t.weight_decay),
                       ("train.checkpoint_every", t.checkpoint_every), ("data.num_workers", d.num_workers)):
        _positive(key, value, strict=False)
    for key, value in (("train.max_steps_per_epoch", t.max_steps_per_epoch),
                       ("train.max_eval_steps", t.max_eval_steps), ("train.eval_batch_size", t.eval_batch_size),
                       ("train.threads", t.threads)):
        _positive(key, value, allow_none=True)
    if not 0 < t.gamma <= 1:
        raise ValueError(f"train.gamma must be in (0, 1], got {t.gamma}")
    if any(b <= a for a, b in zip(t.milestones, t.milestones[1:])) or any(x < 1 for x in t.milestones):
        raise ValueError(f"train.milestones must be increasing epochs >= 1, got {t.milestones}")
    from invseg.nets import check_model_kwargs

    check_model_kwargs(m.name, m.kwargs, provided=CLASSIFY_PROVIDED)  # values: the constructor checks them
    if len(d.synthetic_jpeg_size) != 2 or min(d.synthetic_jpeg_size) < 8:
        raise ValueError(f"data.synthetic_jpeg_size must be [height, width] with both >= 8, got {d.synthetic_jpeg_size}")
    if t.batch_size % world_size:
        raise ValueError(
            f"train.batch_size = {t.batch_size} is the global batch and must be a multiple of the number of "
            f"processes ({world_size}); each process loads batch_size / world_size images"
        )


# --------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------


def _synthetic_params(d: ClassifyDataConfig) -> dict[str, Any]:
    if d.dataset == "synthetic_cifar10":
        return {"dataset": d.dataset, "num_train": 10 * d.synthetic_train_per_class,
                "num_test": 10 * d.synthetic_val_per_class, "seed": d.synthetic_seed}
    return {"dataset": d.dataset, "num_classes": d.synthetic_num_classes,
            "per_class_train": d.synthetic_train_per_class, "per_class_val": d.synthetic_val_per_class,
            "size": list(d.synthetic_jpeg_size), "seed": d.synthetic_seed}


def _ensure_synthetic(d: ClassifyDataConfig) -> None:
    """Write the synthetic dataset unless ``root`` already holds one with the same parameters."""
    root = Path(d.root)
    marker = root / "synthetic.json"
    params = _synthetic_params(d)
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return
        except (OSError, ValueError):
            pass
    if d.dataset == "synthetic_cifar10":
        write_synthetic_cifar10(root, num_train=params["num_train"], num_test=params["num_test"], seed=params["seed"])
    else:
        if (root / "train").exists() or (root / "val").exists():
            # other parameters were written before: start from empty class folders
            import shutil

            for split in ("train", "val"):
                shutil.rmtree(root / split, ignore_errors=True)
        write_synthetic_imagenet(root, num_classes=params["num_classes"], per_class_train=params["per_class_train"],
                                 per_class_val=params["per_class_val"], size=tuple(params["size"]), seed=params["seed"])
    marker.write_text(json.dumps(params))


def build_classification_data(
    data: ClassifyDataConfig, ctx: DistributedContext | None = None
) -> tuple[Dataset, Dataset, int, int]:
    """Training and test/val datasets with the paper's preprocessing (Appendix B.1, B.2).

    Synthetic datasets are written by rank 0 (only when ``data.root`` does not already hold one with
    the same parameters), then every rank waits at a barrier and reads them with the real loader.

    Returns:
        ``(train, test, num_classes, image_size)``.

    Raises:
        FileNotFoundError: ``data.root`` or a file of the expected layout is missing (names the path).
        ValueError: A malformed dataset.
    """
    root = Path(data.root)
    if data.dataset.startswith("synthetic_"):
        if ctx is None or ctx.is_main:
            _ensure_synthetic(data)
        barrier()
    elif (root / "synthetic.json").exists():
        raise ValueError(
            f"data.root = {root} holds a synthetic dataset written by a smoke run ({root / 'synthetic.json'}), "
            f"not the real {data.dataset} data; point data.root at the real data (or use "
            f"data.dataset=synthetic_{data.dataset} to train on the synthetic set)"
        )
    elif not root.exists():
        raise FileNotFoundError(
            f"data.root = {root} does not exist (data.dataset = {data.dataset!r}); "
            + ("expected the folder holding cifar-10-batches-py/" if data.dataset == "cifar10"
               else "expected the folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
        )
    if data.dataset in ("cifar10", "synthetic_cifar10"):
        train = CIFAR10Pickles(root, train=True, transform=cifar10_transforms(True))
        test = CIFAR10Pickles(root, train=False, transform=cifar10_transforms(False))
        return train, test, 10, 32
    size = data.image_size
    resize = max(size, round(size * 256 / 224))
    train, val = imagenet_datasets(root, imagenet_transforms(True, size, resize), imagenet_transforms(False, size, resize))
    return train, val, len(train.classes), size


def build_classifier(model: ClassifyModelConfig, num_classes: int) -> nn.Module:
    """``create_model(model.name, num_classes=num_classes, **model.kwargs)`` (:func:`invseg.nets.create_model`)."""
    from invseg.nets import check_model_kwargs, create_model

    check_model_kwargs(model.name, model.kwargs, provided=CLASSIFY_PROVIDED)
    return create_model(model.name, num_classes=num_classes, **model.kwargs)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    precision: str = "fp32",
    max_steps: int | None = None,
) -> dict[str, float]:
    """Cross-entropy, top-1 and top-5 accuracy (in percent) over ``loader``, summed over all ranks.

    Under DDP give each rank a disjoint shard (the counts are added). Top-5 is top-``min(5, classes)``.

    Returns:
        ``{"val/loss", "val/acc1", "val/acc5", "val/count"}``.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    try:
        for i, (x, y) in enumerate(loader):
            if max_steps is not None and i >= max_steps:
                break
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device.type, precision):
                logits = model(x)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices  # (B, k)
            hit = top.eq(y[:, None])
            totals += torch.stack([
                F.cross_entropy(logits, y, reduction="sum").double(), hit[:, 0].sum().double(),
                hit.any(dim=1).sum().double(), torch.tensor(float(y.numel()), dtype=torch.float64, device=device),
            ])
    finally:
        model.train(was_training)
    loss, c1, c5, n = _sum_over_ranks(totals).tolist()
    n = max(n, 1.0)
    return {"val/loss": loss / n, "val/acc1": 100.0 * c1 / n, "val/acc5": 100.0 * c5 / n, "val/count": n}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), y)


def train_classifier(cfg: ClassifyConfig, ctx: DistributedContext | None = None) -> dict[str, Any]:
    """Train a classifier as configured; resume if the run folder holds ``last.pt`` (``output.resume``).

    Everything is validated before the first step (config rules, data paths, the model's arguments).
    Under ``torchrun`` pass the context of :func:`invseg.train.init_distributed` (``None`` builds a
    single-process one from ``cfg.train.device``).

    Per step: forward under autocast, cross entropy, NaN/inf guard (all ranks stop together), backward
    through the grad scaler, SGD step, spectral-state update. Per epoch: ``MultiStepLR`` step, top-1/5
    evaluation, one log record (``train/loss``, ``train/acc1``, ``val/loss``, ``val/acc1``, ``val/acc5``,
    ``lr``, ``time/epoch_s`` -- training part of the epoch incl. data loading, ``time/step_s`` -- median
    step without data loading, ``time/eval_s``), ``last.pt`` and, for a new best top-1, ``best.pt``.

    Returns:
        The summary (also written to ``run_dir/summary.json`` on rank 0): ``best_acc1``, ``best_acc5``,
        ``best_epoch``, ``final`` (last evaluation), ``epochs``, ``steps``, ``median_epoch_s``,
        ``median_step_s``, ``wall_time_s``, ``num_params``, ``num_classes``, ``device``, ``world_size``,
        ``per_process_batch``, ``run_dir``, ``resumed_from``.

    Raises:
        FileNotFoundError, ValueError: Bad data or config (before training).
        NonFiniteLossError: The loss became NaN/inf; ``last.pt`` is the last good checkpoint.
    """
    from tqdm.auto import tqdm

    ctx = ctx if ctx is not None else init_distributed(cfg.train.device)
    check_classify_config(cfg, ctx.world_size)
    device = ctx.device
    t_cfg, d_cfg = cfg.train, cfg.data
    autocast_context(device.type, t_cfg.precision)  # validates precision against the device
    t_start = time.time()
    seed_everything(t_cfg.seed)  # same initialization on every rank (DDP also broadcasts rank 0's weights)

    # ---- validate at the door: data, then the network
    train_ds, test_ds, num_classes, image_size = build_classification_data(d_cfg, ctx)
    model = build_classifier(cfg.model, num_classes).to(device)
    seed_everything(t_cfg.seed, ctx.rank)  # per-rank streams for dropout

    per_process = t_cfg.batch_size // ctx.world_size
    sampler = ResumableSampler(len(train_ds), shuffle=True, seed=t_cfg.seed, num_replicas=ctx.world_size,
                               rank=ctx.rank)
    train_loader = DataLoader(SeededItems(train_ds), batch_size=per_process, sampler=sampler,
                              num_workers=d_cfg.num_workers, persistent_workers=d_cfg.num_workers > 0,
                              pin_memory=device.type == "cuda",
                              generator=torch.Generator().manual_seed(t_cfg.seed))  # not the global RNG
    shard = Subset(test_ds, list(range(ctx.rank, len(test_ds), ctx.world_size)))
    test_loader = make_loader(shard, batch_size=t_cfg.eval_batch_size or per_process, shuffle=False,
                              num_workers=d_cfg.num_workers, pin_memory=device.type == "cuda",
                              collate_fn=torch.utils.data.default_collate)
    steps_per_epoch = len(train_loader)
    if t_cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, t_cfg.max_steps_per_epoch)

    # ---- optimization state
    optimizer = torch.optim.SGD(model.parameters(), lr=t_cfg.lr, momentum=t_cfg.momentum,
                                weight_decay=t_cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(t_cfg.milestones), gamma=t_cfg.gamma)
    scaler = make_grad_scaler(device.type, t_cfg.precision)
    updater = SpectralUpdater(model, check_every=t_cfg.sn_check_every, search_every=t_cfg.sn_search_every)

    run = TrainingRun(cfg.output.run_dir, cfg, ctx=ctx, resume=cfg.output.resume)
    resumed = run.resume_into(model, optimizer, scheduler, scaler)
    step, epoch, best = 0, 0, None
    progress: dict[str, Any] = {}  # position inside the current epoch (mid-epoch checkpoints)
    best_record: dict[str, Any] = {}
    epoch_times: list[float] = []
    if resumed is not None:
        step, epoch, best = resumed["step"], resumed["epoch"], resumed["best_metric"]
        extra = resumed["extra"] or {}
        progress = dict(extra.get("progress", {}))
        best_record = dict(extra.get("best_record", {}))
        epoch_times = list(extra.get("epoch_times", []))
        updater.count = step  # the same check / no-check pattern of the spectral updates as without a break

    train_model: nn.Module = model
    if ctx.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    timer = StepTimer(device)
    final: dict[str, float] = {}
    info = {"num_classes": num_classes, "image_size": image_size, "dataset": d_cfg.dataset}

    def save(is_best: bool, at_epoch: int, prog: dict[str, Any]) -> None:
        run.save(model, optimizer, scheduler, scaler, epoch=at_epoch, step=step, best_metric=best, is_best=is_best,
                 extra={**info, "progress": prog, "best_record": best_record, "epoch_times": epoch_times})

    try:
        while epoch < t_cfg.epochs:
            sampler.set_epoch(epoch)
            steps_done = int(progress.get("steps", 0))
            if steps_done:
                sampler.set_start(min(int(progress.get("items", 0)), sampler.shard_size))
            sums = torch.tensor(progress.get("sums", [0.0, 0.0, 0.0]), dtype=torch.float64, device=device)
            epoch_time = float(progress.get("time", 0.0))
            bar = tqdm(total=steps_per_epoch, initial=steps_done, disable=not (ctx.is_main and t_cfg.progress),
                       desc=f"epoch {epoch + 1}/{t_cfg.epochs}", dynamic_ncols=True, leave=False)
            train_model.train()
            t_epoch = time.perf_counter()
            try:
                for x, y in train_loader:
                    x = x.to(device, non_blocking=True)
                    y = y.to(device, non_blocking=True)
                    with timer:
                        result = train_step(train_model, x, y, _cross_entropy, optimizer, precision=t_cfg.precision,
                                            scaler=scaler, updater=updater,
                                            check=lambda v: run.check_finite(v, step + 1), reduce=all_reduce_mean,
                                            return_output=True)
                    loss_all = result.loss
                    step += 1
                    steps_done += 1
                    n = y.numel()
                    sums += torch.stack([result.local_loss.double() * n,
                                         (result.output.argmax(1) == y).sum().double(),
                                         torch.tensor(float(n), dtype=torch.float64, device=device)])
                    loss_value = float(loss_all.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", **({"best": f"{best:.2f}"} if best is not None else {}))
                    if step % t_cfg.log_every == 0:
                        run.log(step, epoch, **{"train/step_loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                                "time/step_s": timer.last})
                    if t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0 and steps_done < steps_per_epoch:
                        elapsed = epoch_time + time.perf_counter() - t_epoch
                        save(False, epoch, {"steps": steps_done, "items": steps_done * per_process,
                                            "sums": sums.tolist(), "time": elapsed})
                    if steps_done >= steps_per_epoch:
                        break
            finally:
                bar.close()
            epoch_time += time.perf_counter() - t_epoch
            epoch_times.append(epoch_time)
            scheduler.step()  # milestones count epochs
            epoch += 1
            progress = {}

            t_eval = time.perf_counter()
            final = evaluate_classifier(model, test_loader, device, t_cfg.precision, t_cfg.max_eval_steps)
            eval_s = time.perf_counter() - t_eval
            loss_sum, correct, seen = _sum_over_ranks(sums).tolist()
            seen = max(seen, 1.0)
            score = final["val/acc1"]
            is_best = math.isfinite(score) and (best is None or score > best)
            if is_best:
                best = float(score)
                best_record = {"epoch": epoch, **{k: float(v) for k, v in final.items()}}
            values = {"train/loss": loss_sum / seen, "train/acc1": 100.0 * correct / seen,
                      **{k: v for k, v in final.items() if k != "val/count"},
                      "lr": optimizer.param_groups[0]["lr"], "time/epoch_s": epoch_time,
                      "time/step_s": timer.median(), "time/eval_s": eval_s}
            run.log(step, epoch, **values)
            save(is_best, epoch, {})
            if cfg.output.plot or epoch >= t_cfg.epochs:
                run.plot(title=f"{cfg.model.name} on {d_cfg.dataset}: {run.run_dir}")
            if ctx.is_main and t_cfg.progress:
                tqdm.write(f"epoch {epoch}/{t_cfg.epochs}: train loss {values['train/loss']:.4f}, "
                           f"test top-1 {score:.2f} % (best {best if best is None else round(best, 2)}), "
                           f"{epoch_time:.1f} s")
    finally:
        run.close()

    summary = {
        "model": cfg.model.name,
        "dataset": d_cfg.dataset,
        "epochs": epoch,
        "steps": step,
        "best_acc1": best,
        "best_acc5": best_record.get("val/acc5"),
        "best_epoch": best_record.get("epoch"),
        "final": final,
        "median_epoch_s": _median(epoch_times),
        "median_step_s": timer.median(),
        "wall_time_s": time.time() - t_start,
        "num_params": sum(p.numel() for p in model.parameters()),
        "num_classes": num_classes,
        "device": str(device),
        "world_size": ctx.world_size,
        "per_process_batch": per_process,
        "run_dir": str(run.run_dir),
        "resumed_from": resumed["path"] if resumed else None,
    }
    run.write_json("summary.json", summary)
    return summary


def _median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
