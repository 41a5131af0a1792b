"""Model -> model transforms that export and compile both run, importing neither.

- `dead_units`: remove hidden units a ticket has cut off (outputs unchanged);
- `layers`: `SPARSE_LAYERS`, the layer types every sparse stage handles.

Masks (where they come from, how they are multiplied into a model) live in `ticketc.masks`.
"""

from ticketc.transforms.dead_units import DeadUnitReport, LayerUnits, eliminate_dead_units
from ticketc.transforms.layers import SPARSE_LAYERS, SparseLayer

__all__ = ["SPARSE_LAYERS", "DeadUnitReport", "LayerUnits", "SparseLayer", "eliminate_dead_units"]
