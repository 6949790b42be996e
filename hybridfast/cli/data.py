"""`hybridfast data`."""
from hybridfast.data import add_arguments, run  # noqa: F401  (argparse moves here from the library module)
