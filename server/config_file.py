"""`wattserve serve --config FILE`: a YAML preset of serve options, one key per flag.

Keys are the flags' names without the leading dashes (`max-num-seqs` or `max_num_seqs`), and
`model` for the positional argument. Each value is written back as the command-line words it
stands for and parsed by the serve flags themselves, so a file is checked by the same types
and choices as a command line ("2GiB" reads the same in both). The parsed values become the
parser's defaults, so a flag given on the command line still wins over the file.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import yaml


class PresetError(ValueError):
    """The file cannot be read, or names an option or a value the serve flags refuse."""


def load_preset(path: str, add_arguments: Callable[[argparse.ArgumentParser], None]) -> dict:
    """The preset at `path` as {dest: value}, typed as its flags type them.

    add_arguments: adds the serve flags to a parser (server.cli.add_serve_arguments).
    """
    preset = _read(path)
    flags = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_arguments(flags)
    # argparse lists a parser's actions nowhere public.
    actions = {action.dest: action for action in flags._actions}
    keys = _keys_by_dest(path, preset, actions)
    values, words = {}, []
    for dest, key in keys.items():
        action, value = actions[dest], preset[key]
        if action.nargs == 0 or value is None:
            values[dest] = _unparsed(path, key, action, value)
        elif action.option_strings:
            words += [action.option_strings[0], *_strings(path, key, action, value)]
        else:  # the positional goes first, where no option can take it for its own value
            words = _strings(path, key, action, value) + words
    try:
        parsed = flags.parse_args(words)
    except argparse.ArgumentError as exc:
        raise PresetError(f"{path}: {exc}") from exc
    return {dest: values[dest] if dest in values else getattr(parsed, dest) for dest in keys}


def _keys_by_dest(path: str, preset: dict, actions: dict) -> dict[str, str]:
    keys: dict[str, str] = {}
    for key in map(str, preset):
        dest = key.replace("-", "_")
        if dest in keys:
            raise PresetError(f"{path}: {keys[dest]} and {key} set the same option")
        keys[dest] = key
    unknown = [key for dest, key in keys.items() if dest not in actions]
    if unknown:
        raise PresetError(
            f"{path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            "a preset's keys are the flags of `wattserve serve --help` without their dashes")
    return keys


def _unparsed(path: str, key: str, action: argparse.Action, value):
    """A switch's true or false, or null, which no command-line word spells."""
    if action.nargs == 0:
        if not isinstance(value, bool):
            raise PresetError(f"{path}: {key} is a switch: true or false, not {value!r}")
    elif action.default is not None:
        # null keeps an option unset (the model's context length, no timeout, ...); an option
        # with no unset state refuses it rather than pass None into the engine.
        raise PresetError(f"{path}: {key} cannot be null (its default is {action.default!r})")
    return value


def _strings(path: str, key: str, action: argparse.Action, value) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if (any(v is None or isinstance(v, (bool, dict, list)) for v in items)
            or (isinstance(value, list) and action.nargs not in ("+", "*"))):
        raise PresetError(f"{path}: {key}: {value!r} is not a value this option takes")
    return [str(v) for v in items]


def _read(path: str) -> dict:
    try:
        preset = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise PresetError(f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PresetError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(preset, dict):
        raise PresetError(f"{path}: expected option: value lines, found {type(preset).__name__}")
    return preset
