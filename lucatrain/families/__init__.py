"""Model families, registered by name and selected by `model.model_type`.

A family (torchtitan calls it a TrainSpec) brings everything the generic loop does not know: the
record schema and which input formats it reads, the Task module (model + losses + metrics), the
collator, step callbacks, what a checkpoint must agree on to be resumed, and the export. See
`lucatrain.families.base.Family` and docs/architecture.md ("Adding a model family").
"""

from __future__ import annotations

from lucatrain.families.base import Family

FAMILIES: dict[str, type[Family]] = {}


def register_family(cls: type[Family]) -> type[Family]:
    """Class decorator: make `cls` selectable as `model.model_type=<cls.name>`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in FAMILIES and FAMILIES[cls.name] is not cls:
        raise ValueError(f"model family {cls.name!r} is registered twice ({FAMILIES[cls.name].__name__}, {cls.__name__})")
    FAMILIES[cls.name] = cls
    from lucatrain.config import register_section

    for section, section_cls in cls.config_sections.items():
        register_section(section, section_cls)
    return cls


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str) -> type[Family]:
    """The family class registered as `name`; a ValueError lists the valid names."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (`model.model_type`); registered families are {family_names()}")
    return FAMILIES[name]


# The built-in families register themselves on import.
from lucatrain.families import clibd, lucaone, seq_finetune, simclr  # noqa: E402,F401
