"""Find lottery tickets by iterative magnitude pruning (Frankle & Carbin, ICLR 2019).

`find_tickets([FindConfig(...)], [run_dir])` runs the loop; `ticketc find` wraps it and
`ticketc report` summarises a run directory.
"""

from ticketc.find.config import FindConfig
from ticketc.find.run import FindResult, find_tickets

__all__ = ["FindConfig", "FindResult", "find_tickets"]
