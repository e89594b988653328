"""Multistep simulation and its three gradients (AccuQuant's objective).

From FP trajectory samples ``x_i`` (and the solver state rebuilt from the stored FP
trajectory), run ``M`` quantized denoising steps and compare with the stored FP sample
``M`` steps later: ``L = mean((x~_{i+M} - x_{i+M})^2)``. :func:`multistep_backward`
computes ``L`` and accumulates the gradient of the quantizers' parameters in one of three
ways:

* ``"exact"``: plain autograd through all ``M`` steps; activation memory grows with ``M``.
* ``"checkpoint"``: the same gradient with one step's activations alive at a time. The
  forward pass keeps only the ``M`` inputs (latent and solver state, both small); the
  backward pass recomputes step ``k = M..1`` from its stored input with grad, pushes the
  upstream gradient through it, and hands the gradient at its input to step ``k - 1``.
* ``"approx"``: the paper's O(1) scheme. A no-grad pass gives the latents and
  ``g = dL/dx~_{i+M}``; then each step is recomputed from its detached input and
  back-propagated with ``g`` at its own output (no gradient flows into a step's input).
  With ``M = 1`` it is exact.

Both memory-bounded modes cost one extra no-grad forward per step against ``exact``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..models import Conditions, Denoiser
from ..sampling import Solver

GRAD_MODES = ("exact", "checkpoint", "approx")


def _step(den: Denoiser, solver: Solver, i: int, x: torch.Tensor, state, cond: Conditions):
    out = den(x, solver.timesteps[i], cond)
    return solver.step(i, x, out, state)


def multistep_loss(den: Denoiser, solver: Solver, x: torch.Tensor, state, start: int, m: int, cond: Conditions,
                   target: torch.Tensor) -> torch.Tensor:
    """``L`` with autograd through all ``m`` steps (the ``exact`` graph)."""
    for k in range(m):
        x, state = _step(den, solver, start + k, x, state, cond)
    return (x - target).pow(2).mean()


def multistep_backward(den: Denoiser, solver: Solver, x: torch.Tensor, state, start: int, m: int,
                       cond: Conditions, target: torch.Tensor, mode: str = "checkpoint", weight: float = 1.0) -> float:
    """Compute ``L`` from FP sample ``x`` (and solver ``state``) at step ``start`` over ``m``
    quantized steps, and accumulate the gradients of ``weight * L`` (``.grad``) by ``mode``.
    Returns ``L``."""
    if mode == "exact":
        loss = multistep_loss(den, solver, x, state, start, m, cond, target)
        (weight * loss).backward()
        return loss.item()
    if mode not in GRAD_MODES:
        raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRAD_MODES}")
    # Forward, no grad: keep each step's input (latent and state) only.
    inputs = []
    with torch.no_grad():
        for k in range(m):
            inputs.append((x, state))
            x, state = _step(den, solver, start + k, x, state, cond)
    x_last = x.detach().requires_grad_(True)
    loss = (x_last - target).pow(2).mean()
    (g,) = torch.autograd.grad(weight * loss, x_last)
    if mode == "approx":
        for k in range(m):
            xk, sk = inputs[k]
            out_x, _ = _step(den, solver, start + k, xk, sk, cond)
            out_x.backward(g)
        return loss.item()
    # checkpoint: exact gradient, one step's graph at a time, from the last step back.
    g_x, g_state = g, None
    for k in reversed(range(m)):
        xk, sk = inputs[k]
        leaves, spec = tree_flatten(sk)
        xk = xk.detach().requires_grad_(k > 0)
        leaves = [t.detach().requires_grad_(k > 0 and t.is_floating_point()) if torch.is_tensor(t) else t
                  for t in leaves]
        out_x, out_state = _step(den, solver, start + k, xk, tree_unflatten(leaves, spec), cond)
        outs, grads = [out_x], [g_x]
        if g_state is not None:
            for o, go in zip(tree_flatten(out_state)[0], g_state):
                if torch.is_tensor(o) and o.requires_grad and go is not None:
                    outs.append(o)
                    grads.append(go)
        torch.autograd.backward(outs, grads)
        if k > 0:
            g_x = xk.grad
            g_state = [t.grad if torch.is_tensor(t) else None for t in leaves]
    return loss.item()
