"""The command line: `python -m world --seed 0 --out RUN/world [--if_missing true] [--num_people 40 ...]`."""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import world
from world.build import FILES, write_world
from world.config import WorldConfig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse hook: one line instead of a usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> tuple[WorldConfig, Path, bool]:
    parser = _Parser(prog="python -m world", description=world.__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the world into")
    parser.add_argument(
        "--if_missing",
        type=_boolean,
        default=False,
        help="keep a complete world already at --out if it has the same config",
    )
    for f in dataclasses.fields(WorldConfig):
        parser.add_argument(f"--{f.name}", type=f.type, default=f.default, help=f.metadata["help"])
    args = vars(parser.parse_args(argv))
    out, if_missing = args.pop("out"), args.pop("if_missing")
    try:
        return WorldConfig(**args), out, if_missing
    except ValueError as e:
        parser.error(str(e))


def existing_config(out: Path) -> dict | None:
    """The config of a complete world at `out` (files are renamed into place together), or None."""
    if not all((out / name).is_file() for name in FILES):
        return None
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))["config"]


def main(argv: list[str] | None = None) -> int:
    cfg, out, if_missing = parse_args(argv)
    if if_missing and (found := existing_config(out)) is not None:
        changed = [k for k, v in cfg.to_dict().items() if found.get(k) != v]
        if changed:  # refusing beats silently keeping a world the user asked to change
            print(
                f"python -m world: error: {out} holds a world with a different {changed[0]} "
                f"({found.get(changed[0])!r}, asked {getattr(cfg, changed[0])!r}); remove it or drop --if_missing",
                file=sys.stderr,
            )
            return 2
        print(f"{out}: world already there (seed {cfg.seed}), kept")
        return 0
    write_world(out, cfg)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    sizes = ", ".join(f"{name} {c['total']}" for name, c in summary["counts"].items())
    print(
        f"wrote {out}: {sizes}; corpus {summary['counts']['corpus']['chars']:,} chars; "
        f"labeler agreement with gold {summary['labeler_agreement']:.2f}, "
        f"between two labelers {summary['inter_labeler_agreement']:.2f}"
    )
    return 0
