"""Attribute schema and target distributions.

An *attribute* is a protected property a classifier can read off a face (gender, race, age, ...), with an
ordered tuple of class labels. A *target distribution* is a joint probability table over one or more
attributes, of shape ``(K_1, ..., K_A)``; its row-major flattening indexes the *joint classes* that the
alignment loss assigns images to (gender x race = 8 joint classes).

Users write targets as text, one ``attribute=spec`` group per attribute, separated by ``;``::

    gender=female:0.5,male:0.5;age=young:0.75,old:0.25
    gender=uniform;race=uniform

Several marginals combine as their product (independent attributes). An explicit joint table comes from
YAML/JSON (see :meth:`TargetDistribution.from_mapping`).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

TOLERANCE = 1e-6


class TargetError(ValueError):
    """A target distribution or attribute specification that cannot be used; the message names the entry."""


@dataclass(frozen=True)
class Attribute:
    """A protected attribute: a name and its ordered class labels (at least two)."""

    name: str
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise TargetError(f"attribute {self.name!r} needs at least two classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise TargetError(f"attribute {self.name!r} has repeated classes: {list(self.classes)}")

    def index(self, label: str) -> int:
        """Position of ``label`` in :attr:`classes`; raises :class:`TargetError` naming the unknown label."""
        try:
            return self.classes.index(label)
        except ValueError:
            raise TargetError(
                f"unknown class {label!r} for attribute {self.name!r} (known: {', '.join(self.classes)})"
            ) from None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "classes": list(self.classes)}


# The paper's schema (Shen et al. 2024, §5.1): race has four classes, White includes Middle Eastern
# and Latino Hispanic.
DEFAULT_SCHEMA: dict[str, Attribute] = {
    "gender": Attribute("gender", ("female", "male")),
    "race": Attribute("race", ("White", "Black", "Indian", "Asian")),
    "age": Attribute("age", ("young", "old")),
}


def schema_from_json(items: Sequence[Mapping[str, Any]]) -> dict[str, Attribute]:
    """Build a schema from ``[{"name": ..., "classes": [...]}, ...]`` (the ``fair.attributes`` metadata)."""
    schema: dict[str, Attribute] = {}
    for item in items:
        if not isinstance(item, Mapping) or "name" not in item or "classes" not in item:
            raise TargetError(f"attribute entry must have 'name' and 'classes': {item!r}")
        attribute = Attribute(str(item["name"]), tuple(str(c) for c in item["classes"]))
        if attribute.name in schema:
            raise TargetError(f"attribute {attribute.name!r} is listed twice")
        schema[attribute.name] = attribute
    return schema


def _lookup(schema: Mapping[str, Attribute], name: str) -> Attribute:
    if name not in schema:
        raise TargetError(f"unknown attribute {name!r} (known: {', '.join(schema)})")
    return schema[name]


def _check_probabilities(values: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(values)):
        raise TargetError(f"{what}: probabilities must be finite numbers")
    if np.any(values < 0):
        raise TargetError(f"{what}: probabilities must not be negative")
    total = float(values.sum())
    if abs(total - 1.0) > TOLERANCE:
        raise TargetError(f"{what}: probabilities sum to {total:.9g}, not 1 (tolerance {TOLERANCE:g})")


@dataclass(frozen=True, eq=False)
class TargetDistribution:
    """A joint probability table over ``attributes``.

    Attributes:
        attributes: the attributes, in the order of the table's axes.
        joint: float64 array of shape ``(K_1, ..., K_A)``, non-negative, summing to 1.
    """

    attributes: tuple[Attribute, ...]
    joint: np.ndarray

    def __post_init__(self) -> None:
        if not self.attributes:
            raise TargetError("a target needs at least one attribute")
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise TargetError(f"attribute listed twice in target: {names}")
        joint = np.asarray(self.joint, dtype=np.float64)
        if joint.shape != self.class_sizes:
            raise TargetError(f"joint table has shape {joint.shape}, expected {self.class_sizes} for {names}")
        _check_probabilities(joint, "target " + " x ".join(names))
        object.__setattr__(self, "joint", joint)

    def __eq__(self, other: object) -> bool:
        """Same attributes (names and classes, in order) and exactly the same table."""
        if not isinstance(other, TargetDistribution):
            return NotImplemented
        return self.attributes == other.attributes and np.array_equal(self.joint, other.joint)

    __hash__ = None  # mutable-looking array inside; compare, don't hash

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    @property
    def class_sizes(self) -> tuple[int, ...]:
        return tuple(len(a.classes) for a in self.attributes)

    @property
    def num_joint_classes(self) -> int:
        return int(np.prod(self.class_sizes))

    def flat(self) -> np.ndarray:
        """Joint probabilities over the ``J = prod(K_a)`` joint classes, row-major; shape ``(J,)``."""
        return self.joint.reshape(-1)

    def joint_labels(self) -> list[tuple[str, ...]]:
        """Class labels of each joint class, in the order of :meth:`flat`."""
        return list(itertools.product(*(a.classes for a in self.attributes)))

    def joint_index_table(self) -> np.ndarray:
        """Integer array ``(J, A)``: per joint class, the class index of each attribute."""
        return np.array(list(itertools.product(*(range(k) for k in self.class_sizes))), dtype=np.int64)

    def marginal(self, name: str) -> np.ndarray:
        """Marginal distribution of one attribute; shape ``(K_a,)``."""
        axis = self.names.index(name) if name in self.names else None
        if axis is None:
            raise TargetError(f"attribute {name!r} is not part of this target ({', '.join(self.names)})")
        other_axes = tuple(i for i in range(len(self.attributes)) if i != axis)
        return self.joint.sum(axis=other_axes)

    # ------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, attributes: Sequence[Attribute]) -> "TargetDistribution":
        sizes = tuple(len(a.classes) for a in attributes)
        return cls(tuple(attributes), np.full(sizes, 1.0 / float(np.prod(sizes))))

    @classmethod
    def from_marginals(cls, marginals: Sequence[tuple[Attribute, Sequence[float]]]) -> "TargetDistribution":
        """Product of independent per-attribute marginals."""
        joint = np.ones(())
        for attribute, probabilities in marginals:
            values = np.asarray(probabilities, dtype=np.float64)
            if values.shape != (len(attribute.classes),):
                raise TargetError(f"attribute {attribute.name!r}: expected {len(attribute.classes)} probabilities")
            _check_probabilities(values, f"attribute {attribute.name!r}")
            joint = np.multiply.outer(joint, values)
        return cls(tuple(a for a, _ in marginals), joint)

    @classmethod
    def parse(cls, text: str, schema: Mapping[str, Attribute] = DEFAULT_SCHEMA) -> "TargetDistribution":
        """Parse ``attr=class:p,class:p;attr=uniform`` into the product of the given marginals.

        Classes left out of an attribute's list get probability 0; ``uniform`` spreads evenly.
        """
        groups = [g.strip() for g in text.split(";") if g.strip()]
        if not groups:
            raise TargetError("empty target expression")
        marginals = []
        for group in groups:
            name, sep, spec = group.partition("=")
            if not sep:
                raise TargetError(f"target entry {group!r} must look like 'attribute=class:p,...' or 'attribute=uniform'")
            attribute = _lookup(schema, name.strip())
            marginals.append((attribute, _parse_marginal(attribute, spec.strip())))
        return cls.from_marginals(marginals)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], schema: Mapping[str, Attribute] = DEFAULT_SCHEMA) -> "TargetDistribution":
        """Build from a YAML/JSON mapping. Two forms:

        * marginals: ``{"gender": {"female": 0.5, "male": 0.5}, "age": "uniform"}``
        * joint table: ``{"attributes": ["gender", "age"], "joint": {"female,young": 0.4, ...}}``;
          combinations left out get probability 0.
        """
        if "joint" in data:
            attributes = tuple(_lookup(schema, str(n)) for n in data.get("attributes", []))
            if not attributes:
                raise TargetError("a joint target needs an 'attributes' list")
            joint = np.zeros(tuple(len(a.classes) for a in attributes))
            for key, value in dict(data["joint"]).items():
                labels = [s.strip() for s in str(key).split(",")]
                if len(labels) != len(attributes):
                    raise TargetError(f"joint entry {key!r} must name one class of each of {[a.name for a in attributes]}")
                index = tuple(a.index(label) for a, label in zip(attributes, labels))
                joint[index] = _as_probability(value, f"joint entry {key!r}")
            return cls(attributes, joint)
        marginals = []
        for name, spec in data.items():
            attribute = _lookup(schema, str(name))
            if isinstance(spec, str):
                marginals.append((attribute, _parse_marginal(attribute, spec)))
            elif isinstance(spec, Mapping):
                values = np.zeros(len(attribute.classes))
                for label, value in spec.items():
                    values[attribute.index(str(label))] = _as_probability(value, f"{attribute.name}={label}")
                marginals.append((attribute, values))
            else:
                raise TargetError(f"attribute {attribute.name!r}: expected 'uniform' or a class->probability mapping")
        if not marginals:
            raise TargetError("empty target mapping")
        return cls.from_marginals(marginals)

    @classmethod
    def load(cls, source: str | Path, schema: Mapping[str, Attribute] = DEFAULT_SCHEMA) -> "TargetDistribution":
        """A target from a ``.yaml``/``.yml``/``.json`` file path, or from a text expression."""
        path = Path(str(source))
        if path.suffix.lower() in {".yaml", ".yml", ".json"}:
            if not path.is_file():
                raise TargetError(f"target file not found: {path}")
            try:
                if path.suffix.lower() == ".json":
                    data = json.loads(path.read_text())
                else:
                    import yaml

                    data = yaml.safe_load(path.read_text())
            except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
                raise TargetError(f"{path}: not valid {path.suffix[1:].upper()} ({str(error).splitlines()[0]})") from None
            except Exception as error:  # yaml.YAMLError, imported lazily
                if type(error).__module__.split(".")[0] != "yaml":
                    raise
                raise TargetError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
            if not isinstance(data, Mapping):
                raise TargetError(f"{path}: expected a mapping at the top level")
            return cls.from_mapping(data, schema)
        return cls.parse(str(source), schema)

    # ----------------------------------------------------------- serialisation
    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (the ``fair.target_distribution`` metadata); :meth:`from_json` inverts it."""
        return {
            "attributes": [a.to_json() for a in self.attributes],
            "joint": {",".join(labels): float(p) for labels, p in zip(self.joint_labels(), self.flat())},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TargetDistribution":
        schema = schema_from_json(data.get("attributes", []))
        return cls.from_mapping({"attributes": list(schema), "joint": data.get("joint", {})}, schema)

    def describe(self) -> str:
        """One line per attribute marginal, e.g. ``gender: female 50%, male 50%``."""
        lines = []
        for attribute in self.attributes:
            marginal = self.marginal(attribute.name)
            parts = ", ".join(f"{c} {100 * p:.0f}%" for c, p in zip(attribute.classes, marginal))
            lines.append(f"{attribute.name}: {parts}")
        return "\n".join(lines)


def _as_probability(value: Any, what: str) -> float:
    try:
        probability = float(value)
    except (TypeError, ValueError):
        raise TargetError(f"{what}: {value!r} is not a number") from None
    if not 0.0 <= probability <= 1.0:  # also rejects NaN
        raise TargetError(f"{what}: probability {value!r} is not between 0 and 1")
    return probability


def _parse_marginal(attribute: Attribute, spec: str) -> np.ndarray:
    if spec.lower() == "uniform":
        return np.full(len(attribute.classes), 1.0 / len(attribute.classes))
    values = np.zeros(len(attribute.classes))
    seen = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        label, sep, number = item.partition(":")
        if not sep:
            raise TargetError(f"{attribute.name}: entry {item!r} must look like 'class:probability'")
        index = attribute.index(label.strip())
        if index in seen:
            raise TargetError(f"{attribute.name}: class {label.strip()!r} given twice")
        seen.add(index)
        values[index] = _as_probability(number.strip(), f"{attribute.name}={item}")
    if not seen:
        raise TargetError(f"{attribute.name}: no classes given")
    return values
