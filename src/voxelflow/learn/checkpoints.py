"""Checkpoints of a training under a store prefix (each written atomically, the last ones kept, a torn one
skipped on resume) and the state a resume restores besides the weights: the torch RNG and the GradScaler."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from voxelflow.core.storage import Store


@dataclass(frozen=True)
class Checkpoints:
    """Checkpoints under a store prefix: ``step-00000050.pt``; each written atomically, the last two kept."""

    store: Store
    prefix: str
    keep: int = 2

    def save_best(self, weights: bytes) -> None:
        self.store.write_bytes(f"{self.prefix}/best.safetensors", weights)

    def load_best(self) -> bytes | None:
        key = f"{self.prefix}/best.safetensors"
        return self.store.read_bytes(key) if self.store.exists(key) else None

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


def rng_state(device) -> dict[str, Any]:
    """torch's RNG state on the CPU (and on ``device`` when it is a GPU), for a checkpoint."""
    import torch

    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device) -> None:
    """Restore what :func:`rng_state` saved."""
    import torch

    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def load_scaler(scaler, saved: dict | None) -> None:
    """Restore a GradScaler's state only when both sides have one: the precision may have changed
    between attempts (fp32 or bf16 keep a disabled scaler, whose state is empty; loading it into an
    enabled one raises, and an enabled one's state means nothing to a disabled one)."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)

