"""ticketc: turn lottery tickets into deployable sparse models.

Import cost is kept low and nothing here needs a GPU or Triton: heavy stages are imported
by the functions that use them.
"""

__version__ = "0.1.0"

from ticketc.errors import UserError

__all__ = ["UserError", "__version__"]
