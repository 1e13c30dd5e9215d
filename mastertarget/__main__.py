"""``python -m mastertarget``: see :mod:`mastertarget.main`."""

import sys

from mastertarget.main import main

sys.exit(main())
