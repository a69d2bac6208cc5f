"""``python -m vcid``: the ``vcid`` command (see ``vcid._cli``)."""

from ._cli import main

if __name__ == "__main__":
    main()
