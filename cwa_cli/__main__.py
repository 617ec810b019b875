"""``python -m cwa_cli`` (and ``torchrun --nproc-per-node N -m cwa_cli score ...``)."""

from cwa_cli.main import entry

if __name__ == "__main__":
    entry()
