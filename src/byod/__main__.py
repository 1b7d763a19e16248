"""``python -m byod``: the same as the ``byod`` script."""

from byod.cli import main

main()
