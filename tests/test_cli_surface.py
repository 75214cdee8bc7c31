"""The command-line surface (issue 13 item 2): every reference flag exists, no flag is accepted and ignored, and the
surface is frozen (``tests/data/cli_surface.json``; regenerate with ``python tests/test_cli_surface.py --update``
after an intended change, and say so in the changelog of the pull request).
"""

import argparse
import importlib
import json
import re
import sys
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT.parent / "shared/spec/reference_cli_data_train_infer.md"  # only to regenerate REFERENCE_FLAGS
REFERENCE_FLAGS = ROOT / "tests/data/reference_flags.json"
FROZEN = ROOT / "tests/data/cli_surface.json"
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


class _Parser(Exception):
    pass


def parser_of(script: str) -> argparse.ArgumentParser:
    """The argument parser a console script builds (captured where it parses; nothing after it runs)."""
    module, fn = SCRIPTS[script].split(":")

    def grab(self, *args, **kwargs):
        raise _Parser(self)

    names = ("parse_args", "parse_intermixed_args")  # train_evo2 lets overrides and flags interleave
    saved = {name: getattr(argparse.ArgumentParser, name) for name in names}
    for name in names:
        setattr(argparse.ArgumentParser, name, grab)
    try:
        getattr(importlib.import_module(module), fn)([])
    except _Parser as p:
        return p.args[0]
    finally:
        for name, f in saved.items():
            setattr(argparse.ArgumentParser, name, f)
    raise AssertionError(f"{script} did not parse arguments")


def surface() -> dict[str, list[list]]:
    """Per script: each option's strings, default and choices (subcommands included)."""
    out = {}
    for script in sorted(SCRIPTS):
        parsers = [("", parser_of(script))]
        rows = []
        while parsers:
            prefix, p = parsers.pop()
            for a in p._actions:
                if isinstance(a, argparse._SubParsersAction):
                    parsers += [(f"{prefix}{name} ", sub) for name, sub in a.choices.items()]
                    continue
                default = a.default if isinstance(a.default, (str, int, float, bool, type(None))) else repr(a.default)
                rows.append([prefix + ("/".join(a.option_strings) or a.dest), default,
                             sorted(map(str, a.choices)) if a.choices else None])
        out[script] = sorted(rows, key=lambda r: r[0])
    return out


def spec_flags() -> dict[str, set[str]]:
    """Flags of each reference tool, from the tables of spec section 1."""
    text = SPEC.read_text()
    sections = re.split(r"\n### 1\.(\d+) `([^`]+)`", text.split("\n### 1.11 ")[0])
    return {sections[i + 1]: {f for line in sections[i + 2].splitlines() if line.startswith("| `-")
                              for f in re.findall(r"`(--?[A-Za-z][\w-]*)", line.split("|")[1])}
            for i in range(1, len(sections) - 2, 3)}


def test_every_reference_flag_exists():
    flags = {tool: set(f) for tool, f in json.loads(REFERENCE_FLAGS.read_text())["flags"].items()}
    assert len(flags) == 10 and len(flags["train_evo2"]) > 90
    for tool, wanted in flags.items():
        have = set(parser_of(tool)._option_string_actions)
        assert not wanted - have, f"{tool} lacks reference flags {sorted(wanted - have)}"


def test_cli_surface_is_frozen():
    current = json.loads(json.dumps(surface()))
    frozen = json.loads(FROZEN.read_text())
    changed = {s: [r for r in current.get(s, []) if r not in frozen.get(s, [])] +
               [["removed", *r] for r in frozen.get(s, []) if r not in current.get(s, [])]
               for s in set(current) | set(frozen)}
    changed = {s: rows for s, rows in changed.items() if rows}
    assert not changed, (f"the CLI surface changed: {changed}; if intended, run python tests/test_cli_surface.py "
                         f"--update and commit tests/data/cli_surface.json")


# train_evo2 flags that reach no config key or recipe parameter, and why.
NOT_CONFIG = {
    "--wandb-offline": "sets WANDB_MODE=offline for the W&B client",
    "--debug": "logging verbosity",
    "--print-config": "prints the resolved config and exits",
    "--cpu": "runtime mode (gloo, CPU compat layer), applied before the config is built",
    "--help": "prints help",
    "--mock-data": "the baseline of this test",
}
_EDEN = ["--sharded-eden-data", "--sequence-db-dir", "d", "--train-window-db", "a", "--val-window-db", "b",
         "--test-window-db", "c"]
_DATA = {"--dataset-config": ["-d", "x.yaml"], "--fasta-data": ["--fasta-data", "--fasta-file", "x.fa"],
         "--fasta-file": ["--fasta-data", "--fasta-file", "x.fa"],
         **{f: _EDEN for f in ("--sharded-eden-data", "--sequence-db-dir", "--train-window-db", "--val-window-db",
                               "--test-window-db")}}


def _non_default(action: argparse.Action) -> list[str]:
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, str(list(action.choices)[-1])]
    if action.type in (int, float) or getattr(action.type, "__name__", "") == "_zero_is_off":
        return [flag, "3"]
    return [flag, "dense" if "modules" in flag else "some_value"]


def test_every_train_flag_reaches_the_config_or_is_refused():
    """Each flag lands in a key of the recipe's ConfigContainer (set there and read back) or a parameter of
    ``evo2_pretrain_config``, or is refused with a message naming it - never accepted and ignored."""
    from evo2_recipe.cli.train import build_parser
    from evo2_recipe.cli.train_flags import TRAIN_FLAGS, _csv, recipe_defaults, set_key, split_args
    from evo2_recipe.training.recipe import evo2_pretrain_config

    p = build_parser()
    params = recipe_defaults()
    base = split_args(p.parse_args(["--mock-data"]))
    refused, reached = {}, []
    for action in p._actions:
        if not action.option_strings or set(action.option_strings) & set(NOT_CONFIG):
            continue
        flag = action.option_strings[-1]
        argv = _DATA.get(flag) or ["--mock-data", *_non_default(action)]
        try:
            recipe, keys = split_args(p.parse_args(argv))
        except SystemExit as e:
            refused[flag] = str(e)
            continue
        assert (recipe, keys) != base, f"train_evo2 {' '.join(argv)} is accepted but changes nothing"
        assert set(recipe) <= set(params), f"{flag}: {set(recipe) - set(params)} are no recipe parameters"
        reached.append(flag)
    assert len(reached) > 90, reached
    for flag, message in refused.items():  # refusals name the flag and say why
        assert flag in message and len(message) > len(flag) + 30, (flag, message)
    assert set(refused) == {"--use-targeted-variance-loss", "--nvidia-fault-tolerance", "--hf-tokenizer-model-name"}, \
        refused
    cfg = evo2_pretrain_config("striped_hyena_tiny", mixed_precision_recipe=None, cpu=True)
    for f in TRAIN_FLAGS:  # every key target exists and takes the value
        if "." in f.target and not f.target.startswith("recipe."):
            value = f.const if f.type is None else f.type("3") if f.type not in (str, _csv) else "x"
            set_key(cfg, f.target, value)
            node = cfg
            for part in f.target.split("."):
                node = node[part] if isinstance(node, dict) else getattr(node, part)
            assert node == value or str(node) == f"torch.{value}", (f.target, node, value)


def test_config_keys_and_defaults_come_from_one_place(capsys):
    """A flag not given leaves the recipe's value; a given one lands on its key; ``--print-config`` shows both."""
    from evo2_recipe.cli.train import build_parser, config_from_args, main

    cfg = config_from_args(build_parser().parse_args(["--mock-data", "--model-size", "striped_hyena_tiny",
                                                      "--adam-beta2", "0.9", "--wd", "0.2", "--seq-length", "64"]),
                           cpu=True)
    assert cfg.optimizer.adam_beta2 == 0.9 and cfg.optimizer.adam_beta1 == 0.9  # given / the recipe's
    assert cfg.optimizer.weight_decay == cfg.scheduler.start_weight_decay == cfg.scheduler.end_weight_decay == 0.2
    assert cfg.model.seq_length == cfg.dataset.seq_length == 64
    assert "WD0.2" in cfg.logger.wandb_exp_name
    assert main(["--mock-data", "--model-size", "striped_hyena_tiny", "--cpu", "--lr", "0.0123",
                 "--print-config"]) == 0
    assert "lr: 0.0123" in capsys.readouterr().out


if __name__ == "__main__" and "--update" in sys.argv:
    FROZEN.write_text(json.dumps(surface(), indent=1) + "\n")
    print(f"wrote {FROZEN}")
if __name__ == "__main__" and "--update-reference" in sys.argv:
    REFERENCE_FLAGS.write_text(json.dumps({
        "source": "flag tables of section 1 (1.1-1.10) of the reference recipe's CLI specification "
                  "(reference_cli_data_train_infer.md), extracted by tests/test_cli_surface.py --update-reference",
        "flags": {tool: sorted(f) for tool, f in spec_flags().items()}}, indent=1) + "\n")
    print(f"wrote {REFERENCE_FLAGS}")
