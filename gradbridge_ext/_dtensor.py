"""bridge (and straight_through, rotate_to) of a DTensor: the same mesh and placements, over the local shard.

DTensor runs an operator only if it has a sharding rule for it, and has none for
ours. bridge moves no data, so its rule is ``aten.detach``'s: the output has the
input's placements, whatever they are (Replicate, Shard, Partial), on every mesh
dimension, and ``t`` is never redistributed. DTensor then calls the operator on
the local tensor, so the local result is ``bridge(t.to_local(), grad_scale, attach)``
(an alias of the input's shard), and the operator's autograd kernel, which runs
on the DTensor itself, gives the gradient of each setting.

straight_through(x, q) is q's alias, so its rule is the same with q in t's place;
``x`` is given q's placements (DTensor redistributes an ``x`` placed otherwise), so
that each rank's backward sends its shard's gradient to the same shard of ``x``.

rotate_to(x, q) is q's alias too, but its backward reads whole rows (the last
dimension) of x and q: its rule is straight_through's with a Shard of the last
dimension, or a Partial, replaced by Replicate, so that DTensor gathers such an x
and q in the forward (the one case where rotate_to moves data) and each rank's
backward works on whole rows, with no collective.

The rules are registered with ``torch.distributed.tensor.experimental.register_sharding``
(public, experimental, torch >= 2.5). Importing ``torch.distributed.tensor`` costs
more than ``import gradbridge_ext`` may add over
``import torch``, and only a program that makes DTensors needs the rule; so the
rule is registered when ``torch.distributed.tensor`` is imported: at once if it
already is, or else right after it finishes loading (``_import_hooks``). Nothing here raises on a torch that cannot register
the rule; it warns once, when DTensor is imported, saying why, because DTensor's
own error ("does not have a sharding strategy registered") will not.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import torch

from ._extension import NATIVE
from ._import_hooks import when_imported

DTENSOR_MODULE = "torch.distributed.tensor"

# Why the rule is not registered, once registration has been tried and failed
# (None: registered, or not tried yet because DTensor has not been imported).
skipped: str | None = None
registered = False
_lock = threading.Lock()


def _option_placement(option: Any, placement: Any, ndim: int) -> Any:
    """Where an option goes when the aliased input is placed at ``placement``.

    A number or bool has none. A grad_scale tensor is compared with the local
    shard, so a mask is sharded as the input is along a dimension it spans
    (broadcasting from the right), and replicated where it broadcasts (size 1,
    or missing) or the input is not sharded; DTensor moves it if it must.
    """
    from torch.distributed.tensor import Replicate, Shard

    if not hasattr(option, "placements"):
        return None
    if isinstance(placement, Shard):
        dim = placement.dim - (ndim - len(option.shape))
        if dim >= 0 and option.shape[dim] != 1:
            return Shard(dim)
    return Replicate()


def bridge_sharding(t: Any, *options: Any, **keyword_options: Any) -> list[tuple[list, list]]:
    """The sharding rule for register_sharding: output placements = ``t``'s placements.

    register_sharding expands one mesh dimension's choices to every dimension,
    so offering each placement ``t`` has, as detach's rule does, includes the
    choice that keeps ``t`` exactly as it is; no other is offered, so DTensor
    never moves ``t``'s data for a bridge. ``t`` is DTensor's spec of the input
    (it has ``placements``); the options (``grad_scale`` and ``attach``, or
    ``bridge.Tensor``'s ``grad_scale`` tensor) go where ``_option_placement`` says.
    """
    rest = (*options, *keyword_options.values())
    return [
        ([placement], [placement, *(_option_placement(o, placement, len(t.shape)) for o in rest)])
        for placement in dict.fromkeys(t.placements)
    ]


def straight_through_sharding(x: Any, q: Any, *options: Any, **keyword_options: Any) -> list[tuple[list, list]]:
    """straight_through's rule: bridge's for ``q``, with ``x`` placed as ``q`` is."""
    return [([out], [out, out, *rest]) for (out,), (_, *rest) in bridge_sharding(q, *options, **keyword_options)]


def _whole_rows(placement: Any, ndim: int) -> Any:
    """``placement``, or Replicate where it splits the rows (a Shard of the last dimension) or their values (Partial)."""
    from torch.distributed.tensor import Replicate, Shard

    if isinstance(placement, Shard) and placement.dim not in (ndim - 1, -1):
        return placement
    return placement if isinstance(placement, Replicate) else Replicate()


def rotate_to_sharding(x: Any, q: Any) -> list[tuple[list, list]]:
    """rotate_to's rule: straight_through's, with whole rows on each rank (see the module's docstring)."""
    return [([out], [out, out]) for out in dict.fromkeys(_whole_rows(p, len(q.shape)) for p in q.placements)]


def register() -> None:
    """Register bridge's sharding rule with DTensor, or record and warn why not.

    Called once ``torch.distributed.tensor`` has been imported; never raises.
    """
    global registered, skipped
    if not NATIVE:  # the fallback is detach and view_as, which DTensor already shards
        return
    with _lock:
        if registered or skipped is not None:
            return
        try:
            from torch.distributed.tensor.experimental import register_sharding
        except Exception as error:  # noqa: BLE001 (any failure only disables the rule)
            skipped = (
                f"torch {torch.__version__} has no usable "
                f"torch.distributed.tensor.experimental.register_sharding (torch >= 2.5 has it): "
                f"{type(error).__name__}: {error}"
            )
        else:
            try:
                for packet, rule in (
                    (torch.ops.gradbridge.bridge, bridge_sharding),
                    (torch.ops.gradbridge.straight_through, straight_through_sharding),
                    (torch.ops.gradbridge.rotate_to, rotate_to_sharding),
                ):
                    register_sharding([getattr(packet, name) for name in packet.overloads()])(rule)
                registered = True
            except Exception as error:  # noqa: BLE001
                skipped = f"register_sharding failed on torch {torch.__version__}: {type(error).__name__}: {error}"
        if skipped is not None:
            warnings.warn(
                f"gradbridge_ext: bridge, straight_through and rotate_to of a DTensor will fail (DTensor has "
                f"no sharding rule for gradbridge's operators): {skipped}",
                RuntimeWarning,
                stacklevel=2,
            )


when_imported(DTENSOR_MODULE, register)  # now if DTensor is loaded, else when it is imported
