"""Both scripts in one torchrun launch (starting processes dominates the time on a small
machine): collect_script.py on a gloo group, then trainer_script.py, whose Trainer (accelerate)
reuses that group.

Usage: torchrun --nproc_per_node=2 run_all.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import collect_script
import torch.distributed as dist
import trainer_script

if __name__ == "__main__":
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    collect_script.main(out)
    trainer_script.main(out)
