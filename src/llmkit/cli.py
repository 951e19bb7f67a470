"""`llmkit <command>`: the command-line entry point."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llmkit", description="One toolkit for the whole life of a language model.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train a small model on synthetic additions, end to end on a CPU")
    demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    demo.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    demo.add_argument("--seed", type=int, default=0)

    convert = commands.add_parser("convert", help="load a Hugging Face checkpoint and write it back (validates it)")
    convert.add_argument("source", help="folder with config.json and model.safetensors")
    convert.add_argument("target", help="output folder")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo
        run_demo(out_dir=args.out, steps=args.steps, seed=args.seed)
    elif args.command == "convert":
        from .io import load_hf, save_hf
        save_hf(load_hf(args.source, dtype="auto"), args.target)
        print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
