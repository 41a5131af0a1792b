from ticketc.transforms.dead_units import *  # noqa: F403 - moved to ticketc.transforms (export uses it too)
