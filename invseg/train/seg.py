"""3D segmentation training, evaluation and prediction (MONAI transforms, NIfTI data, IUNet or UNet).

The engine behind ``scripts/train_seg3d.py`` / ``predict_seg3d.py`` / ``compare_seg3d.py``. This module holds
the training loop (:func:`train_seg`) and gives every public name of the engine's modules:

* **Config** (:mod:`invseg.train.seg_config`) -- :class:`SegConfig` (``data``, ``model``, ``train``, ``guard``,
  ``output``), typed dataclasses loaded from YAML with :func:`invseg.config.load_config` (``--set key=value``);
  ``model`` is ``{name, kwargs}`` of a registered network, checked against its constructor.
* **Validation before training** (:mod:`invseg.train.seg_data`: :func:`prepare_seg_data`,
  :func:`check_patch_size`): every case of dataset.json is checked (missing file, image/label shape or affine
  mismatch, label values outside the declared classes, non-finite intensities, empty list), and the patch
  size must be a multiple of what the network needs; each error names the file or key and the rule.
* **Training** (:func:`train_seg`): DiceCE loss, Adam/SGD, cosine/step schedule stepped per
  optimization step, fp32/bf16/fp16 autocast, ``batch_size`` volumes x ``num_samples`` patches per
  step, spectral state updated once per step after ``optimizer.step()`` (DESIGN §1f), validation by
  ``sliding_window_inference`` (roi = patch size) + per-class Dice, best-checkpoint
  selection, tqdm progress, ``metrics.jsonl`` / ``metrics.png`` / ``summary.json`` in the run folder,
  DDP under ``torchrun`` (validation on rank 0). Interrupted runs resume from ``last.pt`` on the same
  trajectory: data sampling depends only on ``(seed, epoch, position)`` (see
  :class:`invseg.train.runner.ResumableSampler`), and the RNG, optimizer, scheduler, scaler and
  spectral states are in the checkpoint.
* **Invertibility guard**: every ``guard.every`` steps the relative reconstruction error
  ``||h - core^-1(core(h))|| / ||h||`` of the IUNet's invertible core on one training patch
  (``h = input_layer(x)``; :func:`invseg.train.seg_eval.guard_error`, by the library checker
  :func:`invseg.blocks.reconstruction_error`) is logged as ``guard/recon_error``; above ``guard.threshold`` it
  warns or stops (:class:`InvertibilityError`).
* **Evaluation and prediction** (:mod:`invseg.train.seg_eval`: :func:`evaluate_seg`, :func:`predict_volumes`):
  validation transforms + sliding window, inverted back to the input grid with MONAI ``Invertd``, written as
  ``<name>_seg.nii.gz`` with the input's affine.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from invseg.data import intensity_warnings, make_loader, make_seg_datasets, seg_train_transforms, seg_val_transforms
from invseg.layers import SpectralUpdater
from invseg.train.amp import autocast_context, make_grad_scaler
from invseg.train.distributed import DistributedContext, all_reduce_mean, init_distributed, seed_everything
from invseg.train.runner import ResumableSampler, SeededItems, StepTimer, TrainingRun
from invseg.train.seg_config import (
    SEG_PROVIDED,
    DataConfig,
    GuardConfig,
    InvertibilityError,
    ModelConfig,
    OutputConfig,
    SegConfig,
    TrainConfig,
    build_seg_model,
    check_seg_config,
)
from invseg.train.seg_data import (
    check_patch_fits,
    check_patch_size,
    describe_run,
    first_image_path,
    naming_unreadable_files,
    prepare_seg_data,
    required_multiple,
    resampled_grids,
    resolve_dataset_json,
    seg_transform_kwargs,
)
from invseg.train.seg_eval import (
    collect_inputs,
    evaluate_seg,
    invert_to_input,
    load_seg_checkpoint,
    predict_volumes,
    guard_error,
)
from invseg.train.step import train_step

__all__ = [
    # config (invseg.train.seg_config)
    "DataConfig",
    "ModelConfig",
    "TrainConfig",
    "GuardConfig",
    "OutputConfig",
    "SegConfig",
    "SEG_PROVIDED",
    "check_seg_config",
    "InvertibilityError",
    "build_seg_model",
    # data (invseg.train.seg_data)
    "resolve_dataset_json",
    "prepare_seg_data",
    "required_multiple",
    "check_patch_size",
    "check_patch_fits",
    "describe_run",
    # evaluation and prediction (invseg.train.seg_eval)
    "guard_error",
    "evaluate_seg",
    "load_seg_checkpoint",
    "invert_to_input",
    "predict_volumes",
    "collect_inputs",
    # training (this module)
    "build_seg_optimizer",
    "build_seg_scheduler",
    "train_seg",
]


def build_seg_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig) -> Any:
    """The per-step learning-rate schedule of ``train.scheduler`` (``None`` for ``"none"``)."""
    if train.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.max_steps)
    if train.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.step_size, gamma=train.gamma)
    return None


def build_seg_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD of ``train.optimizer`` over ``model``'s parameters."""
    if train.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=train.lr, momentum=train.momentum,
                           weight_decay=train.weight_decay)


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _replan_cosine(scheduler: Any, optimizer: torch.optim.Optimizer, step: int, max_steps: int) -> str | None:
    """Re-plan a resumed cosine schedule over a changed ``max_steps`` from ``step``; return the message."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR) or scheduler.T_max == max_steps:
        return None
    old, before = scheduler.T_max, optimizer.param_groups[0]["lr"]
    scheduler.T_max = max_steps
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = scheduler.eta_min + (base - scheduler.eta_min) * (1 + math.cos(math.pi * step / max_steps)) / 2
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return (f"train.max_steps changed from {old} to {max_steps}: the cosine schedule is re-planned over "
            f"{max_steps} steps from step {step} (learning rate {before:.3g} -> "
            f"{optimizer.param_groups[0]['lr']:.3g}, reaching 0 at step {max_steps})")


def train_seg(cfg: SegConfig, ctx: DistributedContext | None = None) -> dict[str, Any]:
    """Train a 3D segmentation network as configured; resume if the run folder holds ``last.pt``.

    Everything is validated before the first step (config rules, dataset files, patch size against
    the network and the resampled volumes, the intensity setting against the data). The main rank
    prints a summary of the run, then one line per validation with the Dice of every class by name.
    Under ``torchrun`` pass the context of :func:`invseg.train.init_distributed` (``None`` builds a
    single-process one from ``cfg.train.device``).

    Resuming (``output.resume``): the model settings must equal the checkpoint's (``ValueError``
    naming the keys otherwise, before anything is written); a changed ``train.max_steps`` extends or
    shortens the run and re-plans a cosine schedule from the current step (a message says so); a
    finished run returns its summary.

    Returns:
        The summary (also written to ``run_dir/summary.json`` on rank 0): ``best_step``,
        ``best_mean_dice``, ``best_dice`` (per class), ``final`` (last validation), ``steps``,
        ``wall_time_s``, ``median_step_s``, ``num_params``, ``device``, ``world_size``, ``run_dir``.

    Raises:
        FileNotFoundError, ValueError: Bad data or config (before training); an unreadable image
            (:class:`invseg.data.UnreadableImageError`, a ``ValueError``) also during training.
        NonFiniteLossError: The loss became NaN/inf; ``last.pt`` is the last good checkpoint.
        InvertibilityError: The guard tripped with ``guard.action="stop"``.
    """
    from monai.data import DataLoader, list_data_collate
    from monai.losses import DiceCELoss
    from tqdm.auto import tqdm

    check_seg_config(cfg)
    ctx = ctx if ctx is not None else init_distributed(cfg.train.device)
    device = ctx.device
    t_cfg, d_cfg, g_cfg = cfg.train, cfg.data, cfg.guard
    autocast_context(device.type, t_cfg.precision)  # validates precision against the device
    t_start = time.time()
    seed_everything(t_cfg.seed, ctx.rank)

    def say(message: str) -> None:
        if ctx.is_main:
            print(message, flush=True)

    # ---- validate at the door: data, then the network against the patch size and the volumes
    dataset_json = resolve_dataset_json(d_cfg, ctx)
    train_list, val_list, info = prepare_seg_data(d_cfg, ctx)
    num_classes, in_channels = int(info["num_classes"]), int(info["num_modalities"])
    model = build_seg_model(cfg.model, in_channels, num_classes)
    check_patch_size(model, d_cfg.patch_size)
    if g_cfg.every and not hasattr(model, "core"):
        raise ValueError(f"guard.every = {g_cfg.every} needs an invertible network (model.name='iunet'), "
                         f"got model.name={cfg.model.name!r}; set guard.every=0")
    cases = list(train_list) + list(val_list)
    grids = resampled_grids(cases, d_cfg)
    for message in check_patch_fits(grids, [first_image_path(c["image"]) for c in cases], d_cfg,
                                    required_multiple(model)[0]):
        if ctx.is_main:
            warnings.warn(message, UserWarning, stacklevel=2)
    if ctx.is_main:
        for message in intensity_warnings([first_image_path(c["image"]) for c in train_list[:2]], d_cfg.intensity,
                                          d_cfg.a_min, d_cfg.a_max):
            warnings.warn(message, UserWarning, stacklevel=2)
    workers = d_cfg.num_workers
    if workers > _available_cpus():
        workers = _available_cpus()
        say(f"data.num_workers = {d_cfg.num_workers} is more than the {workers} CPU(s) this process may use: "
            f"using {workers}")

    # ---- the run folder: a resume must match the checkpoint's model before anything is written
    run = TrainingRun(cfg.output.run_dir, cfg, ctx=ctx, resume=cfg.output.resume, frozen=("model",))
    say(describe_run(cfg, dataset_json, train_list, val_list, info, model, grids))
    model.to(device)

    # ---- data
    patch = tuple(d_cfg.patch_size)
    train_tf = seg_train_transforms(patch_size=patch, num_samples=d_cfg.num_samples, pos=d_cfg.pos,
                                    neg=d_cfg.neg, flip_prob=d_cfg.flip_prob, **seg_transform_kwargs(d_cfg))
    val_tf = seg_val_transforms(**seg_transform_kwargs(d_cfg))
    try:
        with naming_unreadable_files():
            train_ds, val_ds = make_seg_datasets(train_list, val_list if ctx.is_main else [], train_tf, val_tf,
                                                 cache=d_cfg.cache)
    except BaseException:
        run.close()
        raise
    sampler = ResumableSampler(len(train_ds), shuffle=True, seed=t_cfg.seed, num_replicas=ctx.world_size,
                               rank=ctx.rank)
    train_loader = DataLoader(SeededItems(train_ds), batch_size=t_cfg.batch_size, sampler=sampler,
                              num_workers=workers, collate_fn=list_data_collate,
                              persistent_workers=workers > 0, pin_memory=device.type == "cuda")
    val_loader = make_loader(val_ds, batch_size=1, shuffle=False) if ctx.is_main else None

    # ---- optimization state
    optimizer = build_seg_optimizer(model, t_cfg)
    scheduler = build_seg_scheduler(optimizer, t_cfg)
    scaler = make_grad_scaler(device.type, t_cfg.precision)
    updater = SpectralUpdater(model, check_every=t_cfg.sn_check_every, search_every=t_cfg.sn_search_every)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    resumed = run.resume_into(model, optimizer, scheduler, scaler)
    step, epoch, items_done, best = 0, 0, 0, None
    best_record: dict[str, Any] = {}
    if resumed is not None:
        step, epoch, best = resumed["step"], resumed["epoch"], resumed["best_metric"]
        say(f"resuming from {resumed['path']} at step {step} of {t_cfg.max_steps}")
        changed = [c for c in run.config_changes if c[0] != "train.max_steps"]
        if changed:
            say("  settings changed since the checkpoint: "
                + "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed))
        summary_path = Path(cfg.output.run_dir) / "summary.json"
        if step >= t_cfg.max_steps and summary_path.exists():
            # a finished run: nothing to train, and its summary stays as it was
            say(f"this run already finished ({step} steps); summary in {summary_path}. Extend it with a larger "
                "--set train.max_steps=N (a cosine schedule is re-planned), or start over with "
                "--set output.resume=never")
            run.close()
            return json.loads(summary_path.read_text())
        message = _replan_cosine(scheduler, optimizer, step, t_cfg.max_steps)
        if message:
            say(message)
        extra = resumed["extra"] or {}
        items_done = int(extra.get("items_in_epoch", 0))
        best_record = dict(extra.get("best_record", {}))
        updater.count = step  # same check / no-check pattern of the spectral updates as without a break
    else:
        say(f"run folder: {run.run_dir} (new run)")
    extra_info = {"num_classes": num_classes, "num_modalities": in_channels,
                  "label_names": list(info.get("label_names", []))}

    ddp_model: nn.Module = model
    if ctx.distributed:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )

    timer = StepTimer(device)
    plot_title = f"{cfg.model.name}: {run.run_dir}"
    last_plot = last_save = time.time()
    final: dict[str, float] = {}
    bar = tqdm(total=t_cfg.max_steps, initial=step, disable=not (ctx.is_main and t_cfg.progress),
               desc=f"train {cfg.model.name}", dynamic_ncols=True)

    def report(message: str) -> None:
        if not ctx.is_main:
            return
        if t_cfg.progress:
            bar.write(message)
        else:
            print(message, flush=True)

    def save(is_best: bool) -> None:
        nonlocal last_save
        run.save(model, optimizer, scheduler, scaler, epoch=epoch, step=step, best_metric=best, is_best=is_best,
                 extra={**extra_info, "items_in_epoch": items_done, "best_record": best_record})
        last_save = time.time()

    def save_due() -> bool:
        if not t_cfg.checkpoint_minutes:
            return False
        due = torch.tensor([float(time.time() - last_save >= 60.0 * t_cfg.checkpoint_minutes)], device=device)
        if ctx.distributed:
            dist.all_reduce(due, op=dist.ReduceOp.MAX)  # every rank saves together (RNG states are gathered)
        return bool(due.item())

    try:
        with naming_unreadable_files():
            ddp_model.train()
            while step < t_cfg.max_steps:
                sampler.set_epoch(epoch)
                if items_done:
                    sampler.set_start(min(items_done, sampler.shard_size))
                for batch in train_loader:
                    x = batch["image"].to(device, non_blocking=True)  # (B * num_samples, C, *patch)
                    y = batch["label"].to(device, non_blocking=True)  # (B * num_samples, 1, *patch)
                    with timer:
                        loss_all = train_step(ddp_model, x, y, loss_fn, optimizer, precision=t_cfg.precision,
                                              scaler=scaler, grad_clip=t_cfg.grad_clip, scheduler=scheduler,
                                              updater=updater, check=lambda v: run.check_finite(v, step + 1),
                                              reduce=all_reduce_mean).loss
                    step += 1
                    items_done += x.shape[0] // d_cfg.num_samples
                    loss_value = float(loss_all.item())
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}",
                                    **({"best_dice": f"{best:.3f}"} if best is not None else {}))
                    values: dict[str, Any] = {}
                    if step % t_cfg.log_every == 0 or step == 1:
                        values.update({"train/loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                                       "time/step_s": timer.last})
                    if g_cfg.every and step % g_cfg.every == 0:
                        err = _max_over_ranks(guard_error(model, x[:1]), device)
                        values["guard/recon_error"] = err
                        if not err <= g_cfg.threshold:
                            message = (f"invertibility guard: reconstruction error {err:.3e} of the invertible "
                                       f"core exceeds guard.threshold = {g_cfg.threshold:.1e} at step {step}")
                            if g_cfg.action == "stop":
                                run.log(step, epoch, **values)
                                raise InvertibilityError(
                                    f"{message}; training stopped, the last good checkpoint is kept at "
                                    f"{run.last_checkpoint}"
                                )
                            warnings.warn(message, RuntimeWarning, stacklevel=2)
                    validate = step % t_cfg.val_every == 0 or step == t_cfg.max_steps
                    if validate:
                        is_best = False
                        if ctx.is_main:
                            final = evaluate_seg(model, val_loader, roi_size=patch, num_classes=num_classes,
                                                 device=device, precision=t_cfg.precision,
                                                 sw_batch_size=t_cfg.sw_batch_size, overlap=t_cfg.sw_overlap,
                                                 class_names=extra_info["label_names"])
                            values.update(final)
                            score = final["val/mean_dice"]
                            is_best = math.isfinite(score) and (best is None or score > best)
                            if is_best:
                                best = float(score)
                                best_record = {"step": step, **{k: float(v) for k, v in final.items()}}
                            per_class = ", ".join(f"{k[len('val/dice_'):]} {v:.3f}" for k, v in final.items()
                                                  if k.startswith("val/dice_"))
                            best_text = f"{best:.3f} at step {best_record.get('step')}" if best is not None else "-"
                            report(f"step {step}/{t_cfg.max_steps}: val mean Dice {score:.3f} ({per_class}); "
                                   f"best {best_text}; train loss {loss_value:.4f}")
                        if values:
                            run.log(step, epoch, **values)
                        save(is_best)
                        if time.time() - last_plot > 60.0:  # a plot costs ~1 s: at most once a minute
                            run.plot(title=plot_title, by_step=True)
                            last_plot = time.time()
                    else:
                        if values:
                            run.log(step, epoch, **values)
                        if (t_cfg.checkpoint_every and step % t_cfg.checkpoint_every == 0) or save_due():
                            save(False)
                    if step >= t_cfg.max_steps:
                        break
                else:  # the epoch ran out
                    epoch += 1
                    items_done = 0
    finally:
        bar.close()
        run.close()
        run.plot(title=plot_title, by_step=True)  # also after an error: the curves up to it

    summary = {
        "model": cfg.model.name,
        "steps": step,
        "best_step": best_record.get("step"),
        "best_mean_dice": best,
        "best_dice": {k[len("val/dice_"):]: v for k, v in best_record.items() if k.startswith("val/dice_")},
        "final": final,
        "wall_time_s": time.time() - t_start,
        "median_step_s": timer.median(),
        "num_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "world_size": ctx.world_size,
        "run_dir": str(run.run_dir),
        "resumed_from": resumed["path"] if resumed else None,
    }
    run.write_json("summary.json", summary)
    return summary
