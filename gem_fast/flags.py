"""The command line (and YAML) of the training scripts: every :class:`~gem_fast.config.TrainConfig`
field as a ``--flag`` (:func:`parse_config`).

What users type is flat: every field is a ``--flag`` and a top-level YAML key of the same name
(field names are unique across sections), e.g. ``--lr`` sets ``optim.lr``; nested YAML
(``optim: {lr: 1e-5}``, read by :func:`gem_fast.config.read_yaml`) is read as well. ``--beta`` of
``train_sega.py`` is the SEGA reward temperature (the GEM README's flag); of ``train_sft.py``
(DPO/IPO) it is the β of the implicit reward. The transformers/TRL names (``--learning_rate``,
``--output_dir``, ...: :data:`~gem_fast.config.HF_ALIASES`) are aliases. Flag help comes from the
fields, grouped by section. Imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Literal

# Light modules only: the scripts parse their arguments before torch and transformers load.
from gem_fast.config import (HF_ALIASES, PAIR_SECTIONS, SEGA_ALIASES, SEGA_SECTIONS, TrainConfig, config_sections,
                             field_names, read_yaml)
from gem_fast.errors import BOOL_ARG, ArgumentParser, UsageError, add_debug_flag, parse_bool
from gem_fast.reporting import missing_package

__all__ = ["parse_config"]


def _arg_spec(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keywords for a field (also used to coerce YAML strings such as 1e-5)."""
    shown = "" if f.default in (None, "") else f" (default: {f.default})"
    spec: dict[str, Any] = {"help": f.metadata["help"] + shown}
    if "choices" in f.metadata:
        return {**spec, "choices": f.metadata["choices"]}
    if typing.get_origin(hint) is Literal:
        return {**spec, "choices": typing.get_args(hint)}
    if hint is bool:
        return {**spec, **BOOL_ARG}
    if hint in (int, float):
        return {**spec, "type": hint}
    return {**spec, "type": str}  # str and str | None


class _OneSpelling(argparse.Action):
    """Stores a field's value; a field named twice, by two of its spellings (``--lr`` and
    ``--learning_rate``), is a usage error naming both."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        used = getattr(namespace, "_spelling", {})
        if used.setdefault(self.dest, option_string) != option_string:
            parser.error(f"{used[self.dest]} and {option_string} set the same field; give one of them")
        namespace._spelling = used
        setattr(namespace, self.dest, values)


_YAML_KINDS = {int: "an integer", float: "a number", parse_bool: "true or false"}


def _yaml_value(name: str, value: Any, spec: dict[str, Any], where: str) -> Any:
    """A YAML value as the flag's type, or :class:`UsageError` at ``where`` (file:line) naming the key.
    YAML 1.1 leaves 1e-5 a string and reads a bare on/off as a bool: both are taken as meant."""
    kind = spec.get("type")
    if isinstance(value, bool) and "on" in spec.get("choices", ()):
        value = "on" if value else "off"
    fits = {int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
            parse_bool: isinstance(value, bool)}.get(kind, True)
    if not fits and isinstance(value, str):
        try:
            value, fits = kind(value), True
        except (ValueError, argparse.ArgumentTypeError):
            pass
    if not fits:
        raise UsageError(f"{where}: {name} must be {_YAML_KINDS[kind]}, got {value!r}")
    if kind is str and isinstance(value, (list, dict)):
        raise UsageError(f"{where}: {name} must be a single value, got {value!r}")
    if "choices" in spec and value not in spec["choices"]:
        raise UsageError(f"{where}: {name} must be one of {spec['choices']}, got {value!r}")
    return value


def parse_config(argv: list[str] | None, *, objective: str, description: str) -> TrainConfig:
    """TrainConfig from ``--config file.yaml`` and then CLI flags (a flag given wins over YAML).

    Every field is a ``--flag`` (``--resume`` alone means true), listed in ``--help`` under its
    section with its :data:`HF_ALIASES` spelling. ``objective`` "sega" fixes the objective and
    offers the sampling/SEGA sections (``--beta``: the reward temperature); otherwise it is the
    default of ``--objective`` (sft, dpo, ipo) and the pair section is offered. Unknown flags
    (with the closest one), unknown YAML keys, YAML values of the wrong type (with file:line) and a
    field given under two names in one place stop with a one-line usage error naming them.
    Imports no torch: run it before the training modules load.
    """
    sega = objective == "sega"
    hidden = PAIR_SECTIONS if sega else SEGA_SECTIONS
    aliases = {**HF_ALIASES, **(SEGA_ALIASES if sega else {})}
    parser = ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="YAML file of config fields (flat, or nested by section); flags win")
    add_debug_flag(parser)
    specs: dict[str, dict[str, Any]] = {}
    for section in config_sections():
        if section.name in hidden:
            continue
        group = parser.add_argument_group(section.name, section.type_.__doc__)
        hints = typing.get_type_hints(section.type_)
        for f in dataclasses.fields(section.type_):
            if f.name == "objective" and sega:
                continue
            specs[f.name] = _arg_spec(f, hints[f.name])
            if f.name == "objective":
                specs[f.name]["choices"] = ("sft", "dpo", "ipo")
            spellings = [f"--{f.name}", *(f"--{a}" for a, n in aliases.items() if n == f.name)]
            group.add_argument(*spellings, action=_OneSpelling, **specs[f.name])
    cli = vars(parser.parse_args(argv))
    cli.pop("_spelling", None)
    cli.pop("debug", None)  # read by gem_fast.errors.entry_point
    values: dict[str, Any] = {"objective": objective}
    if "config" in cli:
        path = cli.pop("config")
        raw = read_yaml(path, tuple(s.name for s in config_sections() if s.name not in hidden))
        try:
            loaded = field_names(raw, aliases, spell=f"{path}: keys {{}} and {{}}")
        except ValueError as exc:  # a key under two names; a bad file is a UsageError already
            raise UsageError(str(exc)) from None
        if unknown := sorted(set(loaded) - set(specs)):
            parser.error(f"{path}: unknown keys {unknown} for {objective}")
        spelled = {aliases.get(key, key): key for key in raw}
        for name, value in loaded.items():
            try:
                values[name] = _yaml_value(name, value, specs[name], raw.where(spelled[name]))
            except UsageError as exc:
                parser.error(str(exc))
    values.update(cli)
    if why := missing_package(values.get("report_to", "none")):
        parser.error(why)  # before any model loads
    return TrainConfig.from_flat(values)
