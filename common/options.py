"""Command-line options generated from config dataclasses: each field carries its help (and, where its flag is not
simply ``--field-name``, the flag, choices or metavar) beside it, and its default is the dataclass's, so the Python
API and the command line agree and ``--help`` shows every default.

A field's help may end with ``[default: TEXT]`` when the default needs words (a None that means "the run's");
otherwise a non-None default is shown as click shows it.
"""
from __future__ import annotations

import dataclasses
import typing

import click


def option(default=dataclasses.MISSING, help: str = "", *, flag: str | None = None, choices=None,
           metavar: str | None = None, type=None) -> dataclasses.Field:
    """A config field with its command-line help. ``flag``: e.g. "--from", "--freeze-bn/--train-bn", or
    "--no-channels-last" (a flag that sets the field to the opposite of its default); ``type``: a click type
    (e.g. click.IntRange(1)) instead of the annotation's."""
    meta = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "metavar": metavar,
            "type": type}
    return dataclasses.field(default=default, metadata=meta)


def meta(cls, name: str) -> dict:
    """The option metadata of field ``name`` of ``cls``, from the nearest class in its MRO that gives it (a subclass
    that changes only a field's default keeps its help)."""
    for k in cls.__mro__:
        f = getattr(k, "__dataclass_fields__", {}).get(name)
        if f is not None and "help" in f.metadata:
            return f.metadata
    return {}


def base_type(hint):
    """An annotation without its Optional: ``float | None`` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def split_default(help_: str) -> tuple[str, str]:
    """(text without its trailing period, the default its help states or '')."""
    text, _, said = help_.partition(" [default: ")
    return text.rstrip("."), said.rstrip(".").removesuffix("]")


def config_options(cls, skip=(), as_lists: bool = False, inherited=(), inherited_from: str = "--from run's",
                   fallback: str = "train's", bool_pairs: bool = False):
    """A decorator adding a click option for every field of dataclass ``cls`` that has help, but those in ``skip``.
    ``as_lists``: every option takes a comma list (sweep, compare; parsed by the command). ``inherited``: fields whose
    None default means "inherited" (finetune's from --from RUN, else ``fallback``), said so in their help. ``bool_pairs``: every bool
    field as ``--x/--no-x`` (else a field off by default is a plain ``--x`` flag)."""
    decos = []
    hints = typing.get_type_hints(cls)  # once: it evaluates every annotation
    for f in dataclasses.fields(cls):
        m = meta(cls, f.name)
        if f.name in skip or not m:
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        flag = m.get("flag") or "--" + f.name.replace("_", "-")
        text, said = split_default(m["help"])
        if as_lists:
            shown = "none" if default is None else str(default).lower() if isinstance(default, bool) else default
            decos.append(click.option(flag.partition("/")[0], f.name, default=None,
                                      metavar="V[,V...]", help=f"{text}. Comma list to sweep [default: {said or shown}]."))
            continue
        help_ = m["help"]
        if f.name in inherited:
            help_ = f"{text}. [default: the {inherited_from}, else {said or fallback}]"
        shown = not said and f.name not in inherited
        if base_type(hints[f.name]) is bool:
            if flag.startswith("--no-") and "/" not in flag:  # sets the field to the opposite of its default
                decos.append(click.option(flag, f.name, is_flag=True, flag_value=not default, default=default,
                                          help=help_))
            elif "/" in flag or bool_pairs or default is not False:
                flag = flag if "/" in flag else f"{flag}/--no-{flag[2:]}"
                decos.append(click.option(flag, f.name, default=default, show_default=shown, help=help_))
            else:
                decos.append(click.option(flag, f.name, is_flag=True, default=False, help=help_))
            continue
        kind = click.Choice(m["choices"]) if m.get("choices") else m.get("type") or base_type(hints[f.name])
        decos.append(click.option(flag, f.name, default=default, type=kind, metavar=m.get("metavar"),
                                  show_default=shown and default is not None, help=help_))

    def apply(fn):
        for d in reversed(decos):
            fn = d(fn)
        return fn
    return apply
