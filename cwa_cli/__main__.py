"""``python -m cwa_cli`` (and ``torchrun --nproc-per-node N -m cwa_cli score ...``)."""

from cwa_cli.main import main

if __name__ == "__main__":
    main()
