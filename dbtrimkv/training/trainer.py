"""The gate-training loop: `train(config)`.

Why here and not a generic trainer: the step is unusual (teacher and student passes of one frozen
model, only the gates learn) and the bookkeeping must stay exact for resuming, so the loop is
short and explicit. Distribution is `accelerate`'s: run it with
`accelerate launch -m dbtrimkv.cli train --config ...`; each process holds the model on its GPU,
draws its share of every batch, and DDP averages the gate gradients. Gradient accumulation also
goes through `accelerate` (counted across epochs, so `step x grad_accum_steps` micro-batches have
been drawn at optimizer step `step`, which is all a resume needs to find its place in the data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from ..loading.checkpoints import export_released_format, save_gates
from ..settings.eviction_settings import resolve_eviction
from ..errors import ConfigError
from ..inputs.prompts import VideoOptions, is_multimodal, tokenizer_of
from . import run_checkpoints as ckpt
from .train_attention import disable_training_attention
from .collate import Collator, EpochSampler, pack_examples
from .train_config import TrainConfig
from .data import ChatDataset, read_chats
from .log import MetricsLog
from .model import load_for_training, prepare_for_gate_training, training_gate_hooks, unique_gate_parameters
from .objective import GateDistiller
from .synthetic import write_synthetic_dataset

METRICS = ("loss", "kl", "ntp", "capacity", "mass_ratio")


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    model: object  # the trained model, switched back to inference attention (`dbtrimkv`)
    records: list[dict] = field(default_factory=list)  # what this run logged


def train(config: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train the gates as `config` says; `resume`: a checkpoint directory or `latest` (in output_dir)."""
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin

    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but CUDA is not available on this machine")
    accelerator = Accelerator(
        cpu=config.device == "cpu",
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=config.grad_accum_steps,
                                                                sync_with_dataloader=False),
    )
    output = Path(config.output_dir)
    resume_dir = _resume_dir(resume, output)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)

    model, processor, base_model = load_for_training(config, accelerator.device)
    backend = prepare_for_gate_training(model, config.attention, config.gradient_checkpointing)
    gate_hooks = training_gate_hooks(model, config.decay_scale, config.saturation_grad)
    loader = _data_loader(config, processor, accelerator)
    params = unique_gate_parameters(model)
    distiller = GateDistiller(model, config.memory_size, config.capacity, config.loss, config.capacity_weight,
                              config.logits_chunk, config.capacity_chunk)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # Stepped once per optimizer step by hand: accelerate's wrapper would step it once per process.
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.max_steps)
    distiller, optimizer, loader = accelerator.prepare(distiller, optimizer, loader)

    step = 0
    if resume_dir is not None:
        step = ckpt.load_training_state(resume_dir, model, optimizer, scheduler, accelerator.process_index)
    # Saved with the gates: the budget and policy they were trained for become the checkpoint's defaults.
    eviction = resolve_eviction(memory_size=config.memory_size, policy=config.capacity)  # on the library default
    log = MetricsLog(output, config.max_steps, append=resume_dir is not None) if accelerator.is_main_process else None
    if log is not None:
        print(f"training {sum(p.numel() for p in params)} gate parameters of {base_model} | attention {backend} | "
              f"{len(loader.dataset)} sequences | {accelerator.num_processes} process(es) on {accelerator.device} | "
              f"step {step} -> {config.max_steps}" + (f" (resumed from {resume_dir})" if resume_dir else ""),
              flush=True)

    def save(at_step: int) -> None:
        _save_checkpoint(accelerator, ckpt.checkpoint_dir(output, at_step), model, optimizer, scheduler, at_step,
                         config, base_model, eviction)

    records = []
    epoch, skip = divmod(step * config.grad_accum_steps, len(loader))
    window = _Window()
    while step < config.max_steps:
        loader.set_epoch(epoch)
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            with accelerator.accumulate(distiller):
                out = distiller(batch)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and config.max_grad_norm is not None:
                    window.grad_norm = float(accelerator.clip_grad_norm_(params, config.max_grad_norm))
                optimizer.step()
                optimizer.zero_grad()
            window.add(out, int(batch["valid"].sum()))
            if not accelerator.sync_gradients:
                continue
            window.lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            window.steps += 1
            if step % config.log_every == 0 or step == config.max_steps:
                records.append(window.record(accelerator, step))
                if log is not None:
                    log.write(records[-1])
                window = _Window()
            if config.save_every and step % config.save_every == 0 and step < config.max_steps:
                save(step)
            if step >= config.max_steps:
                break
        epoch, skip = epoch + 1, 0

    save(step)
    if accelerator.is_main_process:
        save_gates(model, output, eviction=eviction, base_model=base_model)
        if config.export_released:
            export_released_format(model, output / "released", eviction=eviction, base_model=base_model)
        log.close()
        print(f"saved gates to {output} (dbtrimkv.load_model({str(output)!r}) loads them)", flush=True)
    accelerator.wait_for_everyone()
    for handle in gate_hooks:
        handle.remove()
    disable_training_attention(model)
    model.requires_grad_(False).eval()
    return TrainResult(output, step, model, records)


def _resume_dir(resume: str | None, output: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        found = ckpt.latest_checkpoint(output)
        if found is None:
            raise ConfigError(f"--resume latest: no checkpoint under {output / 'checkpoints'}")
        return found
    ckpt.read_state(resume)  # a clear error now rather than after loading the model
    return Path(resume)


def _data_loader(config: TrainConfig, processor, accelerator) -> DataLoader:
    multimodal = is_multimodal(processor)
    if config.packing and multimodal:
        raise ConfigError("packing is for text-only models (e.g. tiny-text); Qwen3-VL batches are padded instead")
    path = config.train_data
    if path is None:
        path = Path(config.output_dir) / "synthetic" / "train.jsonl"
        if accelerator.is_main_process:
            write_synthetic_dataset(path.parent, config.synthetic_examples, config.seed, images=multimodal)
        accelerator.wait_for_everyone()
    dataset = ChatDataset(read_chats(path), processor, config.max_length,
                          VideoOptions(config.video_fps, config.video_max_frames, config.video_layout),
                          source=str(path))
    if config.packing:
        dataset = pack_examples(dataset.usable_examples(), config.max_length)
    pad = tokenizer_of(processor).pad_token_id
    return DataLoader(dataset, batch_size=config.batch_size, sampler=EpochSampler(len(dataset), config.seed),
                      collate_fn=Collator(0 if pad is None else pad, config.packing), num_workers=config.num_workers)


class _Window:
    """Metrics summed over the micro-batches since the last log line, averaged over processes when logged."""

    def __init__(self):
        self.sums = {name: 0.0 for name in METRICS}
        self.micro = self.steps = self.tokens = 0
        self.lr = self.grad_norm = None
        self.started = time.perf_counter()

    def add(self, out: dict, tokens: int) -> None:
        for name in METRICS:
            self.sums[name] += out[name].detach().float()
        self.micro += 1
        self.tokens += tokens

    def record(self, accelerator, step: int) -> dict:
        values = torch.stack([torch.as_tensor(self.sums[n], dtype=torch.float32, device=accelerator.device)
                              for n in METRICS]) / self.micro
        values = accelerator.reduce(values, "mean").tolist()
        tokens = int(accelerator.reduce(torch.tensor(self.tokens, device=accelerator.device), "sum"))
        return {"step": step, **dict(zip(METRICS, values)), "lr": self.lr, "grad_norm": self.grad_norm,
                "tokens": tokens, "seconds": (time.perf_counter() - self.started) / self.steps}


def _save_checkpoint(accelerator, final: Path, model, optimizer, scheduler, step, config, base_model, eviction):
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        ckpt.write_main_state(tmp, model, optimizer, scheduler, step, config.to_dict(), base_model, eviction)
    accelerator.wait_for_everyone()
    ckpt.write_rng_state(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        ckpt.finalize(tmp, final)
    accelerator.wait_for_everyone()
