"""The script torchrun launches in the distributed tests: runs cwa CLI argv lists in order."""

DRIVER = """
import json, sys
import torch
torch.set_num_threads(1)
from cwa_cli.main import main
for argv in json.loads(sys.argv[1]):
    sys.argv = ["cwa", *argv]
    try:
        main()
    except SystemExit as exc:
        if exc.code:
            raise
"""
