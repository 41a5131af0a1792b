"""A module whose import is the canary: importing it writes $TICKETC_CANARY.

Tests write `tests.canary_module:anything` where ticketc reads strings from files (ticket
architectures, arch.json, ONNX metadata, plans) and check the marker never appears.
"""

import os
from pathlib import Path

_marker = os.environ.get("TICKETC_CANARY")
if _marker:
    Path(_marker).write_text("imported")


def factory(**kwargs: object) -> None:  # what a file would name
    return None
