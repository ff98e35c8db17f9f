"""`python -m mitra_model.cli` runs the `mitra-build` command."""

import sys

from mitra_model.cli.main import main

sys.exit(main())
