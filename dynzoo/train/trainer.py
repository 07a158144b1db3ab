"""The trainer: setup, resume, one epoch, validation, the per-epoch state, and the Hub-ready export at the end."""
import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..evaluate import topk_correct
from ..factory import create_model, is_dynzoo_model
from ..hub import load_checkpoint_file, save_pretrained
from ..models.sdpoint import NIL, SDPointResNet
from ..sdpoint import evaluate_instances, recalibrate_bn
from ..train_state import (COMPACT_NAME, atomic_write, find_resume_state, load_compact_state, save_checkpoint,
                           save_compact_state)
from .datasets import GlobalBatchSampler, build_datasets, make_loader, normalization_of
from .distributed import Distributed, rng_state, set_rng_state
from .recipe import DATASET_CLASSES, TrainStep, build_loss, is_cifar, resolve_config

__all__ = ['run_train', 'Trainer', 'RunParts', 'evaluate', 'resume_state']

# The settings whose change makes a resumed run start a new learning-rate schedule from its global step.
SCHEDULE_KEYS = ('epochs', 'sched', 'milestones', 'decay_rate', 'warmup_epochs', 'warmup_lr', 'min_lr', 'lr')


def autocast(amp: str, device: torch.device):
    if amp == 'none':
        return nullcontext()
    if amp != 'bf16':
        raise ValueError(f"--amp must be 'bf16' or 'none', got {amp!r}")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _batches(loader: DataLoader, device: torch.device, channels_last: bool) -> Iterator[Tuple[torch.Tensor, ...]]:
    """``(images, target)`` on ``device``, images in the run's memory format."""
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, target


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, dist_info: Distributed, config: Dict[str, Any]) -> List[float]:
    """Top-1 (%) of every exit over the whole validation set (counts summed across processes)."""
    model.eval()
    correct, total = None, 0
    for images, target in _batches(loader, dist_info.device, config['channels_last']):
        with autocast(config['amp'], dist_info.device):
            outputs = model(images)
        exits = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        hits = [topk_correct(logits, target)[0] for logits in exits]
        correct = hits if correct is None else [c + h for c, h in zip(correct, hits)]
        total += len(target)
    sums = dist_info.sum((correct or []) + [total])
    return [100.0 * c / sums[-1] for c in sums[:-1]]


def resume_state(args, output: Path) -> Optional[Dict[str, Any]]:
    """The state ``--resume`` continues from (full, else compact; see ``dynzoo.train_state``), or None to start
    fresh. Starting fresh over an existing state is refused: it would be overwritten at the first epoch."""
    if args.resume and args.resume != 'auto':
        path = Path(args.resume)
        if not path.is_file():
            raise FileNotFoundError(f'--resume {path}: no such checkpoint')
        return load_compact_state(path) if path.suffix == '.safetensors' else load_checkpoint_file(path)
    state, path = find_resume_state(output, args.compact_dir, load_checkpoint_file)
    if state is not None and not args.resume:
        raise FileExistsError(f'{path} exists: pass --resume to continue that run, or choose another --output '
                              f'(and --compact-dir)')
    if state is not None:
        print(f'resuming from {path}' + ('' if 'rng' in state else ' (compact state: no RNG state, so the random '
                                                                    'streams differ from an uninterrupted run)'))
    return state


class RunParts:
    """What a run trains and how: model, loss, the module DDP/compile wrap, optimizer, scheduler, optional EMA."""

    def __init__(self, args, config: Dict[str, Any], dist_info: Distributed, steps_per_epoch: int):
        num_classes = args.num_classes or DATASET_CLASSES.get(args.dataset)
        self.model_kwargs = dict(args.model_kwargs or ())
        if num_classes:
            self.model_kwargs['num_classes'] = num_classes
        build = create_model if is_dynzoo_model(args.model) else timm.create_model
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        self.model = build(args.model, pretrained=args.pretrained, **self.model_kwargs)
        torch.manual_seed(args.seed + dist_info.rank)
        self.criterion = build_loss(self.model, args.model, config, dict(args.loss_kwargs or ()))
        self.step_module = TrainStep(self.model, self.criterion).to(dist_info.device)
        if config['channels_last']:
            self.step_module.to(memory_format=torch.channels_last)
        self.ema = (ModelEmaV3(self.model, decay=args.model_ema_decay, use_warmup=True, warmup_power=3 / 4)
                    if args.model_ema else None)
        self.optimizer = create_optimizer_v2(self.step_module, opt=config['opt'], lr=config['lr'],
                                             weight_decay=config['weight_decay'], momentum=config['momentum'],
                                             filter_bias_and_bn=not config['wd_bn_bias'])
        per_epoch = config['sched'] in ('multistep', 'step')
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=config['sched'], num_epochs=config['epochs'], decay_milestones=config['milestones'],
            decay_epochs=config['milestones'][0] if config['sched'] == 'step' else None,
            decay_rate=config['decay_rate'], min_lr=config['min_lr'], warmup_lr=config['warmup_lr'],
            warmup_epochs=config['warmup_epochs'], step_on_epochs=per_epoch, updates_per_epoch=steps_per_epoch)

    def models(self) -> List[nn.Module]:
        """The model, and its EMA when kept."""
        return [self.model] + ([self.ema.module] if self.ema is not None else [])

    def wrapped(self, args, dist_info: Distributed) -> nn.Module:
        """The module the training step calls: DDP across processes, ``torch.compile`` with ``--compile``
        (evaluation and checkpoints use the plain modules, which share the parameters)."""
        module = self.step_module
        if dist_info.enabled:
            module = nn.parallel.DistributedDataParallel(
                module, device_ids=[dist_info.device.index] if dist_info.device.type == 'cuda' else None,
                find_unused_parameters=args.find_unused_parameters or any(True for _ in self.criterion.parameters()))
        return torch.compile(module) if args.compile else module

    def state(self, **progress) -> Dict[str, Any]:
        return dict(model=self.model.state_dict(), criterion=self.criterion.state_dict(),
                    model_ema=self.ema.module.state_dict() if self.ema is not None else None,
                    optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(), **progress)

    def load(self, state: Dict[str, Any], config: Dict[str, Any]) -> None:
        """The weights, EMA, loss, optimizer and (unless the schedule changed) scheduler of a resume state."""
        self.model.load_state_dict(state['model'])
        self.criterion.load_state_dict(state['criterion'])
        self.optimizer.load_state_dict(state['optimizer'])
        if all(state['config'].get(k) == config[k] for k in SCHEDULE_KEYS):
            self.scheduler.load_state_dict(state['scheduler'])
        else:  # timm's schedulers are functions of the step: the new schedule continues from global_step
            for group in self.optimizer.param_groups:
                group['initial_lr'] = config['lr']
        if self.ema is not None:
            if state.get('model_ema') is not None:
                self.ema.module.load_state_dict(state['model_ema'])
            else:
                self.ema.module.load_state_dict(self.model.state_dict())
                print('the resumed run kept no EMA: it starts from the resumed weights')


class Trainer:
    """One run (``dynzoo train`` / ``python -m dynzoo.train``): ``Trainer(args, config, dist_info).run()``."""

    def __init__(self, args, config: Dict[str, Any], dist_info: Distributed):
        self.args, self.config, self.dist = args, config, dist_info
        self.output = Path(args.output)
        checkpoint = resume_state(args, self.output)
        self._prepare_folders()
        for seed in (random.seed, np.random.seed, torch.manual_seed):
            seed(args.seed + dist_info.rank)
        self.train_set, self.val_set = build_datasets(args, config)
        self.sampler = GlobalBatchSampler(len(self.train_set), config['batch_size'], dist_info.rank,
                                          dist_info.world_size, args.seed)
        self.train_loader = make_loader(self.train_set, dist_info.device, args.workers, batch_sampler=self.sampler)
        val_shard = Subset(self.val_set, range(dist_info.rank, len(self.val_set), dist_info.world_size))
        self.val_loader = make_loader(val_shard, dist_info.device, args.workers,
                                      batch_size=max(config['batch_size'] // dist_info.world_size, 1) * 2)
        self.parts = RunParts(args, config, dist_info, len(self.sampler))
        self.epoch, self.global_step, self.history, self.train_time = 0, 0, [], 0.0
        if checkpoint is not None:
            self._restore(checkpoint)
        if isinstance(self.parts.model, SDPointResNet):  # stored per-instance statistics describe earlier weights
            for model in self.parts.models():
                model.clear_bn_stats()
        self.step_fn = self.parts.wrapped(args, dist_info)
        self.record = dict(model=args.model, model_kwargs=self.parts.model_kwargs, dataset=args.dataset,
                           world_size=dist_info.world_size, config=config, epochs=self.history)

    def _prepare_folders(self) -> None:
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            if self.args.compact_dir:
                Path(self.args.compact_dir).mkdir(parents=True, exist_ok=True)

    def _restore(self, state: Dict[str, Any]) -> None:
        """Continue from a resume state: weights and optimizer, progress, and every rank's random streams."""
        self.parts.load(state, self.config)
        rng = state.get('rng')
        if rng is not None and len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank])
        elif rng is not None and self.dist.is_main:
            print(f'resuming on {self.dist.world_size} processes a run saved on {len(rng)}: random streams differ')
        changed = {k: (state['config'].get(k), v) for k, v in self.config.items() if state['config'].get(k) != v}
        if changed and self.dist.is_main:
            print(f'resuming with changed settings (checkpoint, now): {changed}')
        if self.dist.is_main:
            print(f'resumed from epoch {state["epoch"]} ({state["global_step"]} steps)')
        self.epoch, self.global_step = state['epoch'], state['global_step']
        self.history, self.train_time = state['history'], state['train_time']

    def run(self) -> Dict[str, Any]:
        """Train up to the last epoch (or ``--stop-after-epochs``), saving the state every epoch; then export."""
        if self.dist.is_main:
            print(f'training {self.args.model} on {self.args.dataset} ({len(self.train_set)} images, '
                  f'{len(self.sampler)} steps/epoch) with preset {self.config["preset"]}: '
                  + ', '.join(f'{k}={v}' for k, v in self.config.items() if k != 'preset'))
        epochs = self.config['epochs']
        stop = epochs if self.args.stop_after_epochs is None else min(epochs,
                                                                      self.epoch + self.args.stop_after_epochs)
        while self.epoch < stop:
            entry = self.train_epoch()
            if self.epoch == epochs or self.epoch % self.args.eval_interval == 0:
                entry['val_top1'] = self.validate(self.parts.model)
                if self.parts.ema is not None:
                    entry['val_top1_ema'] = self.validate(self.parts.ema.module)
            self.history.append(entry)
            self.save(entry)
        self.record['train_time_s'] = round(self.train_time, 1)
        if self.dist.is_main:
            self._write_log()
        if stop < epochs:
            print(f'stopped after epoch {stop} of {epochs}: continue with --resume')
        else:
            self.finish()
        return self.record

    def train_epoch(self) -> Dict[str, Any]:
        """One epoch of training steps; returns its log entry (no validation yet)."""
        parts, config, epoch = self.parts, self.config, self.epoch
        self.sampler.set_epoch(epoch)
        parts.step_module.train()
        started, loss_sum, steps = time.time(), 0.0, 0
        bar = tqdm(_batches(self.train_loader, self.dist.device, config['channels_last']), total=len(self.sampler),
                   desc=f'epoch {epoch + 1}/{config["epochs"]}', leave=False, dynamic_ncols=True,
                   disable=not self.dist.is_main or self.args.no_progress)
        for images, target in bar:
            with autocast(config['amp'], self.dist.device):
                loss = self.step_fn(images, target)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f'loss is {loss.item()} at epoch {epoch + 1} step {steps + 1}: lower --lr')
            parts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parts.optimizer.step()
            self.global_step += 1
            parts.scheduler.step_update(num_updates=self.global_step)
            if parts.ema is not None:
                parts.ema.update(parts.model, step=self.global_step)
            loss_sum, steps = loss_sum + loss.item(), steps + 1
            bar.set_postfix(loss=f'{loss_sum / steps:.4f}', lr=f'{parts.optimizer.param_groups[0]["lr"]:.4g}')
        parts.scheduler.step(epoch + 1)
        elapsed = time.time() - started
        self.train_time += elapsed
        self.epoch += 1
        loss_total, step_total = self.dist.sum([loss_sum, steps])
        return dict(epoch=self.epoch, train_loss=loss_total / max(step_total, 1),
                    lr=parts.optimizer.param_groups[0]['lr'], val_top1=None, epoch_time_s=round(elapsed, 2),
                    images_per_s=round(len(self.sampler) * config['batch_size'] / elapsed, 1))

    def validate(self, model: nn.Module) -> List[float]:
        """Per-exit top-1 on the validation set. SDPoint networks first get their full instance's batch-norm
        statistics re-estimated on ``--val-recalibrate-batches`` training batches: the shared running statistics
        average over the randomly drawn instances and validate the full one poorly."""
        if isinstance(model, SDPointResNet) and self.args.val_recalibrate_batches > 0:
            with autocast(self.config['amp'], self.dist.device):
                recalibrate_bn(model, self.train_loader, instances=[NIL],
                               num_batches=self.args.val_recalibrate_batches)
        return evaluate(model, self.val_loader, self.dist, self.config)

    def save(self, entry: Dict[str, Any]) -> None:
        """Rank 0: the full resume state, the compact one with ``--compact-dir``, and ``log.json``."""
        rng = self.dist.gather(rng_state())
        if not self.dist.is_main:
            return
        state = self.parts.state(epoch=self.epoch, global_step=self.global_step, rng=rng, history=self.history,
                                 train_time=self.train_time, config=self.config, model_name=self.args.model)
        save_checkpoint(self.output / 'last.pth', state)
        if self.args.compact_dir:
            save_compact_state(Path(self.args.compact_dir) / COMPACT_NAME, state)
        self._write_log()
        tqdm.write(_epoch_line(entry, self.config))

    def _write_log(self) -> None:
        atomic_write(self.output / 'log.json', lambda f: f.write(json.dumps(self.record, indent=1).encode()))

    def finish(self) -> None:
        """After the last epoch: rank 0 exports; the other ranks join the evaluation it may run collectively."""
        last = self.history[-1] if self.history else None
        if self.dist.is_main:
            self.export(last)
        elif not (last and last.get('val_top1')):
            evaluate(self.parts.model, self.val_loader, self.dist, self.config)

    def _best_model(self, last: Optional[Dict[str, Any]]) -> Tuple[nn.Module, Optional[List[float]], Optional[str]]:
        """The model, or its EMA when that validated better: ``(model, accuracy, note)``."""
        accuracy, ema_accuracy = (last.get('val_top1'), last.get('val_top1_ema')) if last else (None, None)
        if ema_accuracy and (accuracy is None or np.mean(ema_accuracy) > np.mean(accuracy)):
            print('exporting the EMA weights: they validated better')
            note = f'EMA of the weights (decay {self.args.model_ema_decay})'
            return self.parts.ema.module, ema_accuracy, '; '.join(filter(None, [self.args.export_note, note]))
        return self.parts.model, accuracy, self.args.export_note

    def _finish_sdpoint(self, model: SDPointResNet) -> Dict[str, float]:
        """The authors' last step: batch-norm statistics re-estimated for every instance on training images
        (``--recalibrate-batches`` batches, stored in the model), then every instance evaluated."""
        with autocast(self.config['amp'], self.dist.device):
            recalibrate_bn(model, self.train_loader, num_batches=self.args.recalibrate_batches)
            loader = make_loader(self.val_set, self.dist.device, self.args.workers,
                                 batch_size=self.config['batch_size'] * 2)
            per_instance = evaluate_instances(model, _batches(loader, self.dist.device, self.config['channels_last']))
        print('per-instance val top-1: ' + ', '.join(f'{k} {v:.2f}' for k, v in per_instance.items()))
        return per_instance

    def export(self, last: Optional[Dict[str, Any]]) -> None:
        """The best weights, Hub-ready (``dynzoo.hub.save_pretrained``) with their validation accuracy."""
        args, config = self.args, self.config
        model, accuracy, note = self._best_model(last)
        per_instance = self._finish_sdpoint(model) if isinstance(model, SDPointResNet) else None
        if per_instance is not None:
            accuracy = [per_instance[NIL.name]]
        if accuracy is None:
            accuracy = evaluate(model, self.val_loader, self.dist, config)
        export = Path(args.export) if args.export else self.output / 'pretrained'
        recipe = {k: config[k] for k in ('preset', 'epochs', 'batch_size', 'opt', 'lr', 'weight_decay', 'sched',
                                         'label_smoothing', 'augment', 'amp')}
        split = 'test' if is_cifar(args.dataset) else 'val'
        save_pretrained(
            model.eval(), export, model_name=args.export_name, per_exit_accuracy=accuracy,
            accuracy_dataset=f'{args.dataset} {split} ({len(self.val_set)} images)',
            training=dict(recipe, trainer='dynzoo.train', processes=self.dist.world_size,
                          train_time_h=round(self.train_time / 3600, 2), train_images=len(self.train_set),
                          **({'note': note} if note else {})),
            dtype=getattr(torch, args.export_dtype), data_config=normalization_of(self.val_set),
            per_instance_accuracy=per_instance)
        print(f'done: per-exit val top-1 {[round(a, 2) for a in accuracy]}; Hub-ready weights in {export}')


def _epoch_line(entry: Dict[str, Any], config: Dict[str, Any]) -> str:
    top1 = lambda accuracy: ' '.join(f'{a:.2f}' for a in accuracy) if accuracy else '-'
    ema = f'  EMA [{top1(entry["val_top1_ema"])}]' if entry.get('val_top1_ema') else ''
    return (f'epoch {entry["epoch"]}/{config["epochs"]}  loss {entry["train_loss"]:.4f}  lr {entry["lr"]:.4g}  '
            f'val top-1 per exit [{top1(entry["val_top1"])}]{ema}  {entry["epoch_time_s"]:.0f}s '
            f'({entry["images_per_s"]:.0f} img/s)')


def run_train(args) -> Dict[str, Any]:
    """Train as ``args`` say; returns the run record written to ``log.json`` (rank 0; other ranks: their view)."""
    config = resolve_config(args)
    dist_info = Distributed(args.device)
    try:
        return Trainer(args, config, dist_info).run()
    finally:
        dist_info.close()
