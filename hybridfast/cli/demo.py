"""`hybridfast demo`."""
from hybridfast.demo import add_arguments, run  # noqa: F401  (argparse moves here from the library module)
