"""Training throughput against plain TRL + PEFT: now `lora-studio bench` (lora_studio/bench.py).

    python benchmarks/train_speed.py [bench options]     # the same as: lora-studio bench [options]

Kept so existing commands keep working; see `lora-studio bench --help` for the options.
"""

from __future__ import annotations

import sys

from lora_studio.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
