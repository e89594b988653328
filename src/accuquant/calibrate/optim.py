"""The one optimiser of the engine."""

from __future__ import annotations

import torch

from .protocol import Group


class Adam:
    """Adam with torch's arithmetic (``torch.optim.Adam``'s single-tensor path: the same
    floats on the CPU), per-parameter state, and optionally relative rates."""

    def __init__(self, groups: list[Group], betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups, self.betas, self.eps = groups, betas, eps
        self.state = {}
        for g in groups:
            for name, p in g.params.items():
                ref = p.detach().abs().clamp_min(1e-8) if g.relative else None
                self.state[name] = {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p), "ref": ref}

    @torch.no_grad()
    def step(self) -> None:
        """One step of every parameter that has a gradient."""
        b1, b2 = self.betas
        for g in self.groups:
            for name, p in g.params.items():
                if p.grad is None:
                    continue
                s = self.state[name]
                s["step"] += 1
                s["m"].lerp_(p.grad, 1 - b1)
                s["v"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                bc1, bc2 = 1 - b1 ** float(s["step"]), 1 - b2 ** float(s["step"])
                denom = (s["v"].sqrt() / bc2**0.5).add_(self.eps)
                ref = s["ref"]
                if ref is None or ref.numel() == 1:
                    lr = g.lr * (float(ref) if ref is not None else 1.0)
                    p.addcdiv_(s["m"], denom, value=-(lr / bc1))
                else:
                    p.addcdiv_(s["m"] * ref, denom, value=-(g.lr / bc1))
                if g.relative:
                    p.clamp_(min=1e-8)

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g.params.values():
                p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, s in self.state.items():
            out[f"adam.{name}.step"] = torch.tensor(s["step"])
            out[f"adam.{name}.m"], out[f"adam.{name}.v"] = s["m"], s["v"]
            if s["ref"] is not None:
                out[f"adam.{name}.ref"] = s["ref"]
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, s in self.state.items():
            s["step"] = int(tensors[f"adam.{name}.step"])
            s["m"], s["v"] = (tensors[f"adam.{name}.{k}"].to(s["m"]).clone() for k in ("m", "v"))
            if s["ref"] is not None:
                s["ref"] = tensors[f"adam.{name}.ref"].to(s["ref"]).clone()
