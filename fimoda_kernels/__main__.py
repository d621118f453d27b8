"""``python -m fimoda_kernels run ...``: the ``fimoda`` command line."""
import sys

from .cli import main

sys.exit(main())
