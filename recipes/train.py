"""Fine-tune an adapter from a YAML recipe; works alone or under `accelerate launch`.

python recipes/train.py recipes/smollm2-lora-cpu.yaml --set max_steps=20
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/train.py recipes/llama-3.2-1b-qlora.yaml
"""

import argparse
import logging
import sys

from lora_studio import LoraStudioError, Recipe, train
from lora_studio.config import add_set_argument


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", help="a YAML recipe")
    add_set_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = train(Recipe.load(args.recipe, args.overrides), resume=args.resume)
    except LoraStudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"adapter: {result.adapter_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
