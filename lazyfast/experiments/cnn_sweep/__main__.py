"""The command line of the CNN sweep, ``python -m lazyfast.experiments.cnn_sweep`` (:func:`main`; also how
:func:`~lazyfast.experiments.cnn_sweep.reproduce` starts its worker processes)."""
import sys

from lazyfast.experiments.cnn_sweep import main

if __name__ == "__main__":
    sys.exit(main())
