"""``python -m mailsrv.cli``: the same as the ``mailsrv`` command."""

import sys

from .main import main

sys.exit(main())
