"""The exact resume state ``ckpttools.integrations.ultralytics`` keeps beside what Ultralytics saves: the fp32
training weights and EMA, the full optimizer state, the RNG states (python, numpy, torch, CUDA, the training
loader's generator) and the mosaic buffer, captured at each save and put back after Ultralytics' own resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def _unwrap(model):
    """The model inside torch.compile (``_orig_mod``) and DataParallel / DDP (``module``) wrappers.  Ultralytics
    8.4 has this as ``unwrap_model``; 8.3 (YOLOFuse's) does not, so it is done here for both."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            inner = getattr(model, "module", None)
            if not isinstance(inner, torch.nn.Module) or not isinstance(
                model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
            ):
                return model
        model = inner


def capture_state(trainer) -> dict:
    model = _unwrap(trainer.model)
    np_state = np.random.get_state()
    rng = {
        "python": _plain(random.getstate()),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    generator = getattr(getattr(trainer, "train_loader", None), "generator", None)
    if generator is not None:
        rng["loader"] = generator.get_state()
    buffer = getattr(_train_dataset(trainer), "buffer", None)
    return {
        "epoch": int(trainer.epoch),
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "ema": {k: v.detach().clone() for k, v in trainer.ema.ema.state_dict().items()} if trainer.ema else None,
        "optimizer": trainer.optimizer.state_dict(),
        "rng": rng,
        # whether the run had closed mosaic augmentation when this was saved (see _SafeMixin.resume_training)
        "mosaic_closed": bool(getattr(trainer, "_ckpttools_mosaic_closed", False)),
        # Ultralytics 8.3 draws mosaic partners from the images its dataset last loaded (``buffer``): part of
        # where the run stands (8.4 has no such list)
        "image_buffer": [int(i) for i in buffer] if isinstance(buffer, list) else None,
    }


def _train_dataset(trainer):
    return getattr(getattr(trainer, "train_loader", None), "dataset", None)


def restore_image_buffer(trainer, saved: list[int] | None) -> None:
    """The images an Ultralytics 8.3 dataset held when the run was saved, loaded again in the order they were
    loaded, so mosaics pick the partners the uninterrupted run picks."""
    dataset = _train_dataset(trainer)
    if saved is None or not isinstance(getattr(dataset, "buffer", None), list):
        return
    dataset.buffer.clear()
    for i in saved:
        dataset.load_image(i)  # loads and appends, as the run did
    if getattr(dataset, "cache", None) != "ram":  # the rest is not in memory, as in the uninterrupted run
        keep = set(saved)
        for j in range(len(dataset.ims)):
            if j not in keep:
                dataset.ims[j], dataset.im_hw0[j], dataset.im_hw[j] = None, None, None
    dataset.buffer[:] = saved


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def restore_state(trainer, state: dict) -> None:
    _unwrap(trainer.model).load_state_dict(state["model"])
    if trainer.ema and state.get("ema"):
        trainer.ema.ema.load_state_dict(state["ema"])
    saved = state["optimizer"]
    for group_saved, group in zip(saved["param_groups"], trainer.optimizer.param_groups):
        group_saved["fused"] = group.get("fused")  # the runtime device picks the kernel, as Ultralytics does
    trainer.optimizer.load_state_dict(saved)
    rng = state["rng"]
    version, internal, gauss = rng["python"]
    random.setstate((version, tuple(internal), gauss))
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    loader = getattr(trainer, "train_loader", None)
    if getattr(loader, "generator", None) is not None and rng.get("loader") is not None:
        _restore_generator_after_next_iterator(loader, rng["loader"])


def _restore_generator_after_next_iterator(loader, state: torch.Tensor) -> None:
    """A DataLoader draws its workers' base seed from its generator when it creates an iterator, which the
    resumed run does once more than the uninterrupted one (a fresh loader; Ultralytics' mosaic-closing reset).
    The saved state is therefore set right after that draw, before the sampler draws the epoch's order."""
    create = loader._get_iterator

    def create_then_restore():
        iterator = create()
        loader.generator.set_state(state)
        _replay_epoch_tail(loader)
        loader._get_iterator = create  # once
        return iterator

    loader._get_iterator = create_then_restore
    if getattr(loader, "iterator", None) is not None:
        # Ultralytics 8.3 creates the loader's iterator when the loader is built (8.4 on first use), so no next
        # iterator would come: make it now, as a fresh 8.4 loader would
        loader.iterator = loader._get_iterator()


def _replay_epoch_tail(loader) -> None:
    """torch's RandomSampler draws one more permutation when its epoch runs out (for the ``num_samples % n``
    tail), which the uninterrupted run does at the first batch of the next epoch, after the save.  A fresh
    sampler in the resumed run would not: the same draw is made here so the next epoch's order is the same."""
    from torch.utils.data import RandomSampler

    sampler = getattr(
        getattr(loader.batch_sampler, "sampler", None), "sampler", None
    )  # _RepeatSampler > Batch > Random
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.generator is loader.generator:
        torch.randperm(len(sampler.data_source), generator=loader.generator)
