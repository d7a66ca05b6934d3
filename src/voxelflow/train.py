"""Training: the spec's MONAI network on the preprocessed store, mixed precision, atomic checkpoints.

A retry resumes from the newest checkpoint; the data order is a pure function of the seed
and the epoch, so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import io
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from voxelflow.config import TrainSpec, resolve_monai
from voxelflow.storage import Store


def build_network(network: dict[str, dict[str, Any]]):
    (name, kwargs), = network.items()
    return resolve_monai("monai.networks.nets", name, "network")(**kwargs)


def build_loss(loss: dict[str, dict[str, Any]]):
    (name, kwargs), = loss.items()
    return resolve_monai("monai.losses", name, "loss")(**kwargs)


def build_optimizer(optimizer: dict[str, dict[str, Any]], params, learning_rate: float):
    """The spec's ``torch.optim`` optimizer; ``lr`` defaults to ``train.learning_rate``."""
    import torch

    (name, kwargs), = optimizer.items()
    return getattr(torch.optim, name)(params, **{"lr": learning_rate, **kwargs})


def build_scheduler(scheduler: dict[str, dict[str, Any]] | None, opt):
    """The spec's LR scheduler (stepped once per epoch), or None."""
    import torch

    if scheduler is None:
        return None
    (name, kwargs), = scheduler.items()
    return getattr(torch.optim.lr_scheduler, name)(opt, **kwargs)


def device_for(prefer: str | None = None):
    import torch

    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(precision: str, device):
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class TrainResult:
    weights: bytes
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    resumed_from: int | None = None
    seconds: float = 0.0
    device: str = "cpu"


@dataclass(frozen=True)
class Checkpoints:
    """Checkpoints under a store prefix: ``step-00000050.pt``; each written atomically, the last two kept."""

    store: Store
    prefix: str
    keep: int = 2

    def steps(self) -> list[str]:
        return [n for n in self.store.list(self.prefix) if n.startswith("step-") and n.endswith(".pt")]

    def save(self, step: int, state: dict[str, Any]) -> str:
        import torch

        buf = io.BytesIO()
        torch.save(state, buf)
        key = f"{self.prefix}/step-{step:08d}.pt"
        self.store.write_bytes(key, buf.getvalue())
        for old in self.steps()[:-self.keep]:
            self.store.remove(f"{self.prefix}/{old}")
        return key

    def load_latest(self, device) -> dict[str, Any] | None:
        """The newest checkpoint that loads; a torn or corrupt newest one falls back to the one before."""
        import torch

        for name in reversed(self.steps()):
            try:
                return torch.load(io.BytesIO(self.store.read_bytes(f"{self.prefix}/{name}")), map_location=device,
                                  weights_only=True)
            except Exception:  # noqa: BLE001 - unreadable checkpoint: try the previous one
                continue
        return None

    def clear(self) -> None:
        self.store.remove(self.prefix)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def train(
    spec: TrainSpec,
    images: np.ndarray,
    labels: np.ndarray,
    checkpoints: Checkpoints,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train ``spec.network`` on in-memory arrays (N, C, *spatial); returns the final weights."""
    import torch

    if len(images) == 0:
        raise ValueError("no training cases: ingest data first")
    dev = device_for(device)
    if spec.precision == "fp16-mixed" and dev.type != "cuda":
        raise ValueError(f"precision fp16-mixed needs a CUDA device, and training runs on {dev.type}: "
                         "use bf16-mixed or fp32 there")
    torch.manual_seed(spec.seed)
    net = build_network(spec.network).to(dev)
    loss_fn = build_loss(spec.loss)
    opt = build_optimizer(spec.optimizer, net.parameters(), spec.learning_rate)
    sched = build_scheduler(spec.scheduler, opt)
    use_scaler = spec.precision == "fp16-mixed" and dev.type == "cuda"
    scaler = torch.amp.GradScaler(dev.type, enabled=use_scaler)
    x_all = torch.as_tensor(images, dtype=torch.float32, device=dev)
    y_all = torch.as_tensor(labels, dtype=torch.float32, device=dev)
    n = len(x_all)
    steps_per_epoch = -(-n // spec.batch_size)

    step, history, resumed, running = 0, [], None, []
    state = checkpoints.load_latest(dev)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        step, resumed = int(state["step"]), int(state["step"])
        history = [dict(h) for h in state["history"]]
        running = [float(v) for v in state.get("running", [])]

    start = time.perf_counter()
    net.train()
    total = spec.epochs * steps_per_epoch
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        order = epoch_order(n, spec.seed, epoch)
        idx = torch.as_tensor(order[offset * spec.batch_size : (offset + 1) * spec.batch_size], device=dev)
        opt.zero_grad(set_to_none=True)
        with autocast_for(spec.precision, dev):
            loss = loss_fn(net(x_all[idx]), y_all[idx])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        running.append(float(loss.detach()))
        step += 1
        if step % steps_per_epoch == 0:
            metrics = {"train_loss": float(np.mean(running)), "lr": float(opt.param_groups[0]["lr"])}
            if sched is not None:
                sched.step()
            history.append({"epoch": epoch, **metrics})
            running = []
            if on_epoch:
                on_epoch(epoch, metrics)
        if step % spec.checkpoint_every_steps == 0 or step == total:
            checkpoints.save(
                step,
                {"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                 "scheduler": sched.state_dict() if sched is not None else None,
                 "step": step, "history": history, "running": running},
            )
    return TrainResult(
        weights=state_dict_bytes(net),
        history=history,
        steps=step,
        resumed_from=resumed,
        seconds=time.perf_counter() - start,
        device=str(dev),
    )


def state_dict_bytes(net) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()})


def load_network(network: dict[str, dict[str, Any]], weights: bytes, device: str | None = None):
    """Rebuild a network from its spec and safetensors weights (no pickle)."""
    from safetensors.torch import load

    net = build_network(network)
    net.load_state_dict(load(weights))
    return net.to(device_for(device)).eval()
