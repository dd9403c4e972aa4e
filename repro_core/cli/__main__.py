"""``python -m repro_core.cli``: the same as the ``repro`` entry point."""

from . import main

if __name__ == "__main__":
    main(prog_name="repro")
