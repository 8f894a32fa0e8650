"""``python -m lazyfast.bench``: the ``lazyfast bench`` command (and its memory-measuring child)."""
import sys

from lazyfast.bench import main

sys.exit(main())
