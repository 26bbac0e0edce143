"""``python -m nebula_async.cli``: the same as the ``nebula-async`` command."""

import sys

from ._main import main

sys.exit(main())
