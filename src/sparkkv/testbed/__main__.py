"""``python -m sparkkv.testbed``: evaluate the shipped model (see :func:`sparkkv.testbed.evaluate.main`)."""

from .evaluate import main

main()
