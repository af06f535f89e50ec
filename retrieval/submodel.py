"""`Submodel`: which nested encoder a query uses, a trained level or Mix'n'Match widths, by value.

    Submodel()                      # D: the full model (level 1)
    Submodel(level=4)               # D/4: width d_model/4 in every layer
    Submodel(widths=(192, 96, ...)) # Mix'n'Match: one width per layer
    Submodel.parse("D/4"), Submodel.parse("4"), Submodel.parse("mnm:192,96,..."), Submodel.parse("192,96,...")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from vision_model.config import MatMambaVisionConfig
from vision_model.cost import submodel_cost

MNM_PREFIX = "mnm:"


@dataclass(frozen=True)
class Submodel:
    level: int | None = None
    widths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.level is not None and self.widths is not None:
            raise ValueError("a submodel is a level or per-layer widths, not both")
        if self.widths is not None:
            widths = tuple(int(w) for w in self.widths)
            if not widths:
                raise ValueError("widths needs at least one width")
            object.__setattr__(self, "widths", widths)
        elif self.level is None:
            object.__setattr__(self, "level", 1)  # no choice made: the full model
        elif not isinstance(self.level, int) or isinstance(self.level, bool) or self.level < 1:
            raise ValueError(f"level must be a positive int (1, 2, 4, 8, ...), got {self.level!r}")

    # -- names -----------------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """"D", "D/4" or "mnm:192,96,...": short, readable and parseable by `Submodel.parse`."""
        if self.widths is not None:
            return MNM_PREFIX + ",".join(map(str, self.widths))
        return "D" if self.level == 1 else f"D/{self.level}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> "Submodel":
        """"D", "D/4", "4", "mnm:192,96,..." or "192,96,..." -> Submodel."""
        text = str(text).strip()
        spec = text[len(MNM_PREFIX):] if text.lower().startswith(MNM_PREFIX) else text
        try:
            if "," in spec or text.lower().startswith(MNM_PREFIX):
                return cls(widths=tuple(int(w) for w in spec.split(",") if w.strip()))
            if spec.upper() == "D":
                return cls(level=1)
            if spec.upper().startswith("D/"):
                return cls(level=int(spec[2:]))
            return cls(level=int(spec))
        except ValueError:
            raise ValueError(f"cannot read submodel {text!r}: use D, D/2, D/4, D/8, a level (1, 2, 4, 8) or "
                             "comma-separated per-layer widths") from None

    @classmethod
    def coerce(cls, value: Submodel | int | str | Sequence[int] | None) -> Submodel:
        """Accept what a caller naturally has: a Submodel, a level, a name, widths, or None (the full model)."""
        if isinstance(value, Submodel):
            return value
        if value is None:
            return cls()
        if isinstance(value, int):
            return cls(level=value)
        if isinstance(value, str):
            return cls.parse(value)
        return cls(widths=tuple(value))

    # -- against a model's config ---------------------------------------------------------------------------------
    def resolve(self, config: MatMambaVisionConfig) -> tuple[int, ...]:
        """Per-layer widths; raises ValueError if this submodel does not fit the config."""
        return config.resolve_widths(None if self.widths is not None else self.level, self.widths)

    def canonical(self, config: MatMambaVisionConfig) -> "Submodel":
        """Uniform widths of a trained level become that level (so "mnm:96,96,..." reads "D/2")."""
        widths = self.resolve(config)
        for level in config.levels:
            if widths == (config.d_model // level,) * config.depth:
                return Submodel(level=level)
        return Submodel(widths=widths)

    def flops(self, config: MatMambaVisionConfig) -> int:
        """Encoder FLOPs per query image (cost model; no classifier head: retrieval does not use it)."""
        widths = self.resolve(config)
        return submodel_cost(config, widths=widths, include_head=False).flops

    def mflops(self, config: MatMambaVisionConfig) -> float:
        return self.flops(config) / 1e6

    def to_dict(self) -> dict:
        return {"name": self.name, "level": self.level, "widths": list(self.widths) if self.widths else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Submodel":
        return cls(level=d.get("level"), widths=tuple(d["widths"]) if d.get("widths") else None)


def trained_levels(config: MatMambaVisionConfig) -> list[Submodel]:
    """D, D/2, D/4, D/8 (those the config supports), largest first."""
    return [Submodel(level=level) for level in config.levels]
