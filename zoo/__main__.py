"""``python -m zoo``: the same command line as ``zoo``."""

from zoo.cli import main

main(prog_name="zoo")  # so that help, errors and completion (_ZOO_COMPLETE) say `zoo`
