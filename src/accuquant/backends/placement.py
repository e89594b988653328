"""Where a frozen model's layers run and what it holds: the accounting that ``accuquant
speed``, ``sample`` and the benchmarks report."""

from __future__ import annotations

from torch import nn


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``model`` holds: its parameters and buffers (each storage once)
    and the opaque prepacked weights of its kernels (``packed``)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    for m in model.modules():
        total += sum(p.numel() * p.element_size() for p in getattr(m, "packed", ()))
    return total


def placement(model: nn.Module) -> dict[str, list[str]]:
    """Frozen layers by the backend that runs them; a fallback's entry gives its reason."""
    out: dict[str, list[str]] = {}
    for name, layer in model.named_modules():
        k = getattr(layer, "kernel", None)  # a frozen QuantLayer's backend module
        if not (isinstance(k, nn.Module) and hasattr(layer, "codes_in_kernel")):
            continue
        where = getattr(k, "runs_on", "fake")
        why = getattr(k, "why", None)
        out.setdefault(where, []).append(name + (f" ({why})" if why else ""))
    return out
