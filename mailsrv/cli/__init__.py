"""The ``mailsrv`` command (``main``): the parser and dispatch in :mod:`.main`, the output
formatting in :mod:`.format`, the account commands in :mod:`.accounts`, the queue commands
in :mod:`.queue`."""

from .main import main

__all__ = ["main"]
