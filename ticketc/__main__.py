from ticketc.cli import entry

entry()
