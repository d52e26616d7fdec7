"""Type checks for option dataclasses read from YAML or JSON files, where "2" or true can stand for a number.

Each field's annotation names what it takes: `int`, `float`, `bool`, `str`, or one of them `| None`. Other
annotations (tuples, nested configs) are checked where those values are built.
"""

from __future__ import annotations

from dataclasses import fields

from msd.errors import MSDError

#: annotation -> (accepts a value, how an error message names the expected kind)
KINDS = {
    "int": (lambda value: isinstance(value, int) and not isinstance(value, bool), "a whole number"),
    "float": (lambda value: isinstance(value, (int, float)) and not isinstance(value, bool), "a number"),
    "bool": (lambda value: isinstance(value, bool), "true or false"),
    "str": (lambda value: isinstance(value, str), "a string"),
}


def check_field_types(options, label: str) -> None:
    """Raise MSDError naming the first field of the dataclass instance `options` whose value has the wrong type.

    label: how messages name the options, for example "training option".
    """
    for item in fields(options):
        annotation = item.type if isinstance(item.type, str) else getattr(item.type, "__name__", "")
        kinds = [part.strip() for part in annotation.split("|")]
        value = getattr(options, item.name)
        if value is None and "None" in kinds:
            continue
        known = [KINDS[kind] for kind in kinds if kind in KINDS]
        if len(known) != len([kind for kind in kinds if kind != "None"]):
            continue  # a composite annotation
        if not any(accepts(value) for accepts, _ in known):
            expected = " or ".join(name for _, name in known) + (" or null" if "None" in kinds else "")
            raise MSDError(f"{label} {item.name} must be {expected}, got {value!r}.")
