"""``python -m skymoe`` (also what ``torchrun -m skymoe`` runs)."""

import sys

from .cli import main

sys.exit(main())
