"""docs/configuration.md documents exactly the keys of the config schema."""

import dataclasses
import re
from pathlib import Path

from sf.config import TrainConfig
from sf.tasks import TASKS

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def schema_keys(node, prefix=""):
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            yield from schema_keys(value, prefix + field.name + ".")
        else:
            yield prefix + field.name


def test_configuration_reference_matches_schema():
    """Every shared key and every task's `task.*` key is documented, and nothing else."""
    documented = set(re.findall(r"^\| `([a-z0-9_.]+)` \|", DOC.read_text(), flags=re.M))
    groups = {"task", "model", "teacher", "data", "deepspeed", "logger", "experiment"}
    keys = {key for key in schema_keys(TrainConfig()) if key != "task"}
    for schema, _ in TASKS.values():
        keys |= set(schema_keys(schema(), "task."))
    assert sorted(keys - documented) == [], "keys missing from docs/configuration.md"
    assert sorted(documented - keys - groups) == [], "docs/configuration.md documents keys that do not exist"
