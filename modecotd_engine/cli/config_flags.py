"""Command-line flags derived from a config dataclass, so that a field is declared once.

Every field of the dataclass becomes one ``--kebab-case`` flag whose help, choices and flag name come
from the field's ``metadata`` (``help``, ``choices``, ``flag``) and whose default is the field's:

* a tuple field is one comma-separated string (``--targets q_proj,v_proj``);
* a bool field is a switch that sets the opposite of its default (``--resume`` for a False default,
  ``--no-progress`` for a True one: name it with ``flag``);
* anything else takes the type of its default (``str`` when the default is None).
"""

from __future__ import annotations

import argparse
import dataclasses


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return _flag(f).lstrip("-").replace("-", "_")


def add_config_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """Add one flag per field of the dataclass ``config_cls`` to ``parser`` (see the module docstring)."""
    for f in dataclasses.fields(config_cls):
        if "help" not in f.metadata:
            raise TypeError(f"{config_cls.__name__}.{f.name} has no help in its metadata")
        help_ = f.metadata["help"].replace("%", "%%")  # argparse formats help with %
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(_flag(f), dest=_dest(f), action="store_true", help=help_)
        elif isinstance(default, tuple):
            parser.add_argument(_flag(f), dest=_dest(f), default=",".join(default), help=help_)
        else:
            kind = str if default is None else type(default)
            parser.add_argument(_flag(f), dest=_dest(f), type=kind, default=default,
                                choices=f.metadata.get("choices"), help=help_)


def config_from_args(config_cls, args: argparse.Namespace):
    """The ``config_cls`` instance the flags added by :func:`add_config_flags` describe."""
    values = {}
    for f in dataclasses.fields(config_cls):
        value = getattr(args, _dest(f))
        if isinstance(f.default, bool):
            value = (not f.default) if value else f.default
        elif isinstance(f.default, tuple):
            value = tuple(v for v in value.split(",") if v)
        values[f.name] = value
    return config_cls(**values)
