"""How a model is cut into pipeline stages: decoder layers per stage and, per stage, how many of
its layers recompute their activations in backward instead of storing them.

The first stage also runs the embedding and the last stage the final norm, LM head and loss
(docs/pipeline.md), so an even layer split is not an even work split; a layout may give any
stage any number of layers. Only the first and last stages may have none (they still hold the
embedding or the head); a middle stage without layers would do nothing but pass activations on.
Recomputation applies to a stage's first ``recompute[s]`` layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .layout import split_sizes


def parse_counts(text: str, what: str) -> tuple[int, ...]:
    """Per-stage counts from ``"5,5,4"``; ``what`` names the setting in errors."""
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v != "")
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers (e.g. 5,5,5,5,4), "
                          f"got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty; give one count per pipeline stage")
    return values


@dataclass(frozen=True)
class PipelineLayout:
    """``layers[s]`` decoder layers on stage ``s`` (in model order) and ``recompute[s]`` of
    them (the stage's first ones) recomputed in backward."""

    layers: tuple[int, ...]
    recompute: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        object.__setattr__(self, "recompute", tuple(int(n) for n in self.recompute)
                           or (0,) * len(self.layers))

    @classmethod
    def uniform(cls, num_layers: int, stages: int, recompute: int = 0) -> "PipelineLayout":
        """Layers split as evenly as possible (earlier stages one more), ``recompute`` layers
        recomputed per stage (capped at the stage's layer count)."""
        if stages < 1:
            raise ConfigError(f"the number of pipeline stages must be >= 1, got {stages}")
        layers = split_sizes(num_layers, stages)
        return cls(tuple(layers), tuple(min(recompute, n) for n in layers))

    @classmethod
    def parse(cls, layers: str, recompute: str = "") -> "PipelineLayout":
        """From ``"5,5,5,5,4"`` and optionally ``"2,1,0,0,0"``."""
        counts = parse_counts(layers, "parallel.pp_layers")
        return cls(counts, parse_counts(recompute, "parallel.pp_recompute") if recompute else ())

    @property
    def stages(self) -> int:
        return len(self.layers)

    @property
    def num_layers(self) -> int:
        return sum(self.layers)

    def stage_layers(self, stage: int) -> range:
        """The global indices of the decoder layers on ``stage``."""
        start = sum(self.layers[:stage])
        return range(start, start + self.layers[stage])

    def recomputed_layers(self, stage: int) -> range:
        """The global indices of the layers of ``stage`` that recompute in backward."""
        layers = self.stage_layers(stage)
        return layers[:self.recompute[stage]]

    def stage_of(self, layer: int) -> int:
        """The stage holding decoder layer ``layer``."""
        for stage in range(self.stages):
            if layer in self.stage_layers(stage):
                return stage
        raise ValueError(f"layer {layer} is not in a {self.num_layers}-layer layout")

    def describe(self) -> str:
        """``layers 5,5,5,5,4 recompute 2,1,0,0,0``."""
        text = "layers " + ",".join(map(str, self.layers))
        if any(self.recompute):
            text += " recompute " + ",".join(map(str, self.recompute))
        return text

    def validate(self, num_layers: int, stages: int | None = None) -> "PipelineLayout":
        """Raise ``ConfigError`` saying what to change when the layout does not fit a model of
        ``num_layers`` decoder layers on ``stages`` stages (when given)."""
        if stages is not None and self.stages != stages:
            raise ConfigError(f"the pipeline layout has {self.stages} stages "
                              f"({self.describe()}) but parallel.pp * parallel."
                              f"pp_stages_per_rank = {stages}")
        if len(self.recompute) != self.stages:
            raise ConfigError(f"parallel.pp_recompute has {len(self.recompute)} entries for "
                              f"{self.stages} stages; give one count per stage")
        if any(n < 0 for n in self.layers):
            raise ConfigError(f"layer counts must be >= 0 ({self.describe()})")
        if self.num_layers != num_layers:
            raise ConfigError(f"the pipeline layout places {self.num_layers} layers "
                              f"({'+'.join(map(str, self.layers))}) but the model has "
                              f"{num_layers}; the counts must sum to {num_layers}")
        for s, n in enumerate(self.layers):
            if n == 0 and 0 < s < self.stages - 1:
                raise ConfigError(f"stage {s} of {self.describe()} has no layers; only the "
                                  "first stage (embedding) and the last (LM head and loss) may "
                                  "be without decoder layers")
        for s, (n, r) in enumerate(zip(self.layers, self.recompute)):
            if not 0 <= r <= n:
                raise ConfigError(f"stage {s} recomputes {r} layers but holds {n}; "
                                  "parallel.pp_recompute must be between 0 and the stage's "
                                  "layer count")
        return self
