"""Counting host synchronisations: a ``TorchFunctionMode`` that counts the calls which make the
host wait for the device (or would, on a GPU): reading values (``.item``, ``.tolist``,
``bool`` / ``int`` / ``float`` of a tensor), copies to the host (``.cpu``, ``.numpy``,
``.to("cpu")``), and ops whose output shape depends on values (``nonzero``, ``unique``,
``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``). On the
CPU none of them waits, but each is one stall of the launch queue on a GPU, so their number per
forward is what a CPU test can assert exactly. (``.to(x.device)`` is not counted: on a GPU it
moves nothing when ``x`` is on the device; ``.cpu()`` and ``.to("cpu")`` are.)
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

#: tensor methods / functions that read values into the host
_READS = {torch.Tensor.item: "item", torch.Tensor.tolist: "tolist", torch.Tensor.__bool__: "bool",
          torch.Tensor.__int__: "int", torch.Tensor.__float__: "float", torch.Tensor.__index__: "index",
          torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}
#: ops whose output size depends on the values
_DATA_SHAPED = {torch.nonzero: "nonzero", torch.Tensor.nonzero: "nonzero", torch.unique: "unique",
                torch.Tensor.unique: "unique", torch.masked_select: "masked_select",
                torch.Tensor.masked_select: "masked_select", torch.argwhere: "nonzero",
                torch.unique_consecutive: "unique"}


def _is_bool_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class SyncCounter(TorchFunctionMode):
    """``with SyncCounter() as c: model(**inputs)`` -> ``c.total`` and ``c.by_kind`` (a Counter);
    ``c.sites`` keeps the Python frames (file:line) of each counted call when ``where=True``."""

    def __init__(self, where: bool = False, ours: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self.where = where or ours is not None
        self.ours = ours
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def _count(self, kind: str) -> None:
        if not self.where:
            self.by_kind[kind] += 1
            return
        import traceback

        for fr in reversed(traceback.extract_stack()[:-3]):
            if "/torch/" in fr.filename:
                continue
            # ``ours``: count only calls made from files under these folders (the package's own
            # syncs, whatever the transformers version adds)
            if self.ours is None or any(f"/{o}/" in fr.filename for o in self.ours):
                self.by_kind[kind] += 1
                self.sites[f"{kind} {'/'.join(fr.filename.rsplit('/', 2)[-2:])}:{fr.lineno} {fr.name}"] += 1
            break

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = _READS.get(func) or _DATA_SHAPED.get(func)
        if kind is None:
            if func is torch.Tensor.__getitem__ and len(args) > 1 and _is_bool_index(args[1]):
                kind = "bool_index"
            elif func is torch.Tensor.__setitem__ and len(args) > 1 and _is_bool_index(args[1]):
                kind = "bool_index"
            elif func is torch.Tensor.to and any(isinstance(a, str) and a.startswith("cpu") for a in args[1:]):
                # only an explicit "cpu": ``.to(other.device)`` stays on the device on a GPU (on
                # this CPU run every device object is the CPU and says nothing)
                kind = "cpu"
            elif func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs \
                    and len(args) > 1 and torch.is_tensor(args[1]):
                kind = "repeat_interleave"
        if kind is not None:
            self._count(kind)
        return func(*args, **kwargs)


#: the folders whose calls are the package's own (engine, strategies, families)
OURS = ("tokenprune", "patches")


def count_syncs(fn: Callable[[], Any], where: bool = False, ours: tuple[str, ...] | None = None) -> SyncCounter:
    """Run ``fn`` once under a :class:`SyncCounter` and return it."""
    with SyncCounter(where=where, ours=ours) as c:
        fn()
    return c
