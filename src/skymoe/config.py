"""Model configuration and its Hugging Face ``config.json`` forms.

One dataclass describes every model skymoe runs. It reads and writes three HF flavours:

- ``skywork`` / ``skywork_moe``: Skywork-MoE (``num_experts`` written as a list, ``moe_*`` keys);
- ``mixtral``: ``num_local_experts`` / ``num_experts_per_tok``; loads as Skywork-MoE with gating
  normalization off (that is exactly Mixtral's block);
- ``llama``: dense (``num_experts = 0``).

Keys skymoe does not use are kept in ``extra`` and written back unchanged, so a load/save round
trip loses nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError

FLAVORS = ("skywork", "skywork_moe", "mixtral", "llama")
_ARCHITECTURES = {
    "skywork": "SkyworkForCausalLM",
    "skywork_moe": "SkyworkForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "llama": "LlamaForCausalLM",
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys written from the dataclass itself (never copied from ``extra``).
_DERIVED_KEYS = {"architectures", "model_type", "num_local_experts", "rope_parameters", "dtype"}


@dataclass
class SkyworkMoeConfig:
    """Architecture of a decoder-only LM whose FFNs are dense or Skywork-MoE blocks.

    Field names follow the HF ``config.json`` keys. ``num_experts = 0`` means a dense model;
    layer ``i`` is an MoE layer when ``num_experts > 0`` and ``(i + 1) % moe_expert_interval == 0``
    (Megatron's 1-based "every n-th layer" convention); other layers use a dense SwiGLU MLP.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    initializer_range: float = 0.01
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str = "bfloat16"
    # Mixture of experts.
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_expert_interval: int = 1
    moe_use_logits_norm: bool = True
    moe_gate_norm_std: float = 1.0
    moe_2layer_gate: bool = False
    moe_feature_no_mul_topk: bool = True
    moe_use_skywork_gating: bool = False
    # skymoe's key: each MoE layer has a routing bias (auxiliary-loss-free balancing, the
    # ``block_sparse_moe.expert_bias`` tensors); written to config.json only when true.
    moe_expert_bias: bool = False
    # Which HF flavour this config was read as / is written as.
    model_type: str = "skywork_moe"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ----------------------------------------------------------------------------------- derived
    @property
    def head_size(self) -> int:
        """Per-head dimension (``head_dim`` if set, else hidden / heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` (0-based) has an MoE block instead of a dense MLP."""
        return self.is_moe and (layer_idx + 1) % self.moe_expert_interval == 0

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.torch_dtype]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    # -------------------------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the offending key if the configuration is unusable."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "moe_expert_interval", "num_experts_per_tok"):
            _require_int(key, getattr(self, key), minimum=1)
        _require_int("num_experts", self.num_experts, minimum=0)
        if self.sliding_window is not None:
            _require_int("sliding_window", self.sliding_window, minimum=1)
        if self.head_dim is not None:
            _require_int("head_dim", self.head_dim, minimum=1)
        elif self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config key 'hidden_size' = {self.hidden_size} is not divisible by "
                f"'num_attention_heads' = {self.num_attention_heads}; set 'head_dim' explicitly")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config key 'num_key_value_heads' = {self.num_key_value_heads} must divide "
                f"'num_attention_heads' = {self.num_attention_heads}")
        if self.head_size % 2:
            raise ConfigError(f"head size {self.head_size} must be even for rotary embeddings "
                              "(check 'head_dim' / 'hidden_size')")
        if self.is_moe and self.num_experts_per_tok > self.num_experts:
            raise ConfigError(
                f"config key 'num_experts_per_tok' = {self.num_experts_per_tok} exceeds "
                f"'num_experts' = {self.num_experts}")
        if self.moe_use_skywork_gating:
            raise ConfigError("config key 'moe_use_skywork_gating' = true is not supported "
                              "(Skywork-MoE-Base sets it false)")
        if self.is_moe and self.moe_use_logits_norm and self.num_experts < 2:
            raise ConfigError("config key 'moe_use_logits_norm' needs 'num_experts' >= 2 (the "
                              "std over one logit is undefined)")
        if self.hidden_act != "silu":
            raise ConfigError(f"config key 'hidden_act' = {self.hidden_act!r} is not supported "
                              "(only 'silu', the SwiGLU FFN of Llama/Mixtral/Skywork)")
        for key in ("rope_theta", "rms_norm_eps", "moe_gate_norm_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"config key '{key}' = {value!r} must be a positive number")
        if self.torch_dtype not in _DTYPES:
            raise ConfigError(f"config key 'torch_dtype' = {self.torch_dtype!r} is not one of "
                              f"{sorted(_DTYPES)}")
        if self.model_type not in FLAVORS:
            raise ConfigError(f"config key 'model_type' = {self.model_type!r} is not supported; "
                              f"expected one of {FLAVORS}")
        if self.model_type == "llama" and self.is_moe:
            raise ConfigError("a 'llama' config cannot have experts; use model_type "
                              "'skywork_moe' or 'mixtral' for an MoE model")
        if self.model_type == "mixtral" and (not self.is_moe or self.moe_use_logits_norm
                                             or self.moe_expert_interval != 1
                                             or self.moe_2layer_gate
                                             or not self.moe_feature_no_mul_topk
                                             or self.moe_expert_bias):
            raise ConfigError(
                "a 'mixtral' config describes plain top-k routing on every layer: it needs "
                "num_experts > 0, moe_use_logits_norm false, moe_expert_interval 1, "
                "moe_2layer_gate false, moe_feature_no_mul_topk true and no moe_expert_bias; "
                "use model_type 'skywork_moe' for the Skywork options")

    # ------------------------------------------------------------------------------ HF reading
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "SkyworkMoeConfig":
        """Build a config from a parsed HF ``config.json`` (Skywork-MoE, Mixtral or Llama)."""
        if not isinstance(raw, dict):
            raise ConfigError("config.json must hold a JSON object")
        d = dict(raw)
        flavor = d.pop("model_type", None)
        if flavor is None:
            arch = (d.get("architectures") or [""])[0]
            flavor = {"SkyworkForCausalLM": "skywork_moe", "MixtralForCausalLM": "mixtral",
                      "LlamaForCausalLM": "llama"}.get(arch)
        if flavor not in FLAVORS:
            raise ConfigError(f"config key 'model_type' = {flavor!r} is not supported; "
                              f"skymoe reads {', '.join(FLAVORS)} checkpoints")
        d.pop("architectures", None)
        kwargs: dict[str, Any] = {"model_type": flavor}

        if flavor == "mixtral":
            kwargs["num_experts"] = d.pop("num_local_experts", 8)
            kwargs["num_experts_per_tok"] = d.pop("num_experts_per_tok", 2)
            kwargs["moe_use_logits_norm"] = False
        elif flavor == "llama":
            kwargs["num_experts"] = 0
        else:
            experts = d.pop("num_experts", [16])
            if isinstance(experts, list):
                if not experts or len(set(experts)) != 1:
                    raise ConfigError(f"config key 'num_experts' = {experts!r}: skymoe supports "
                                      "one expert count for all MoE layers (e.g. [16])")
                experts = experts[0]
            kwargs["num_experts"] = experts
            kwargs["num_experts_per_tok"] = d.pop("num_experts_per_tok", 2)
            # Skywork's config class defaults moe_2layer_gate to true: a config.json without
            # the key means a 2-layer gate (the released model writes false explicitly).
            kwargs["moe_2layer_gate"] = d.pop("moe_2layer_gate", True)

        _read_rope(d, kwargs)
        # transformers v5 writes "dtype"; older versions (and Skywork) "torch_dtype".
        dtype = d.pop("dtype", None)
        d.setdefault("torch_dtype", dtype)

        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "model_type"}
        if flavor == "llama":
            names.discard("sliding_window")  # Llama has no sliding window; keep it verbatim
        if flavor != "skywork" and flavor != "skywork_moe":
            # Skywork-only keys are meaningless (and absent) in Mixtral / Llama configs.
            names -= {"moe_expert_interval", "moe_use_logits_norm", "moe_gate_norm_std",
                      "moe_2layer_gate", "moe_feature_no_mul_topk", "moe_use_skywork_gating",
                      "moe_expert_bias"}
        extra: dict[str, Any] = {}
        for key, value in d.items():
            if key in names and key not in kwargs:
                kwargs[key] = value
            else:
                extra[key] = value
        if kwargs.get("torch_dtype") is None:
            kwargs.pop("torch_dtype", None)
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "SkyworkMoeConfig":
        """Read an HF ``config.json`` (or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file (expected an HF config.json)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_hf_dict(raw)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------------------ HF writing
    def to_hf_dict(self, model_type: str | None = None) -> dict[str, Any]:
        """The HF ``config.json`` contents in this config's flavour (or ``model_type``)."""
        flavor = model_type or self.model_type
        if flavor != self.model_type:
            dataclasses.replace(self, model_type=flavor)  # raises if this model has no such form
        out: dict[str, Any] = {"architectures": [_ARCHITECTURES[flavor]], "model_type": flavor}
        common = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                  "rope_theta", "rms_norm_eps", "hidden_act", "tie_word_embeddings",
                  "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id")
        for key in common:
            out[key] = getattr(self, key)
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.sliding_window is not None or flavor == "mixtral":
            out["sliding_window"] = self.sliding_window
        out["torch_dtype"] = self.torch_dtype
        if flavor == "mixtral":
            out["num_local_experts"] = self.num_experts
            out["num_experts_per_tok"] = self.num_experts_per_tok
        elif flavor in ("skywork", "skywork_moe"):
            out["num_experts"] = [self.num_experts]
            out["num_experts_per_tok"] = self.num_experts_per_tok
            for key in ("moe_expert_interval", "moe_use_logits_norm", "moe_gate_norm_std",
                        "moe_2layer_gate", "moe_feature_no_mul_topk", "moe_use_skywork_gating"):
                out[key] = getattr(self, key)
            if self.moe_expert_bias:
                out["moe_expert_bias"] = True
            out.setdefault("rope_scaling", None)
        for key, value in self.extra.items():
            if key not in out and key not in _DERIVED_KEYS:
                out[key] = value
        return out

    def save(self, directory: str | Path, model_type: str | None = None) -> Path:
        """Write ``config.json`` into ``directory``; returns its path."""
        path = Path(directory) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_dict(model_type), indent=2) + "\n")
        return path


def _require_int(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"config key '{key}' = {value!r} must be an integer >= {minimum}")


def _read_rope(d: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """Accept ``rope_theta`` (+ ``rope_scaling: null``) and transformers v5 ``rope_parameters``."""
    params = d.pop("rope_parameters", None)
    if isinstance(params, dict):
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"config key 'rope_parameters' = {params!r}: only plain RoPE "
                              "(rope_type 'default') is supported")
        if "rope_theta" in params:
            kwargs["rope_theta"] = params["rope_theta"]
    scaling = d.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, dict)
                                or scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ConfigError(f"config key 'rope_scaling' = {scaling!r}: RoPE scaling is not "
                          "supported (Skywork-MoE uses null)")
    if "rope_theta" in d:
        kwargs["rope_theta"] = d.pop("rope_theta")


PRESETS_DIR = Path(__file__).parent / "configs"


def resolve_config(spec: str | Path) -> SkyworkMoeConfig:
    """A config from a preset name (``tiny``, ``bench``, ``skywork-moe-base``), a config.json
    path, or a checkpoint directory."""
    preset = PRESETS_DIR / f"{spec}.json"
    if not Path(spec).exists() and preset.is_file():
        return SkyworkMoeConfig.from_json_file(preset)
    if not Path(spec).exists():
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))
        raise ConfigError(f"{spec}: no such file or directory, and not a preset ({names})")
    return SkyworkMoeConfig.from_json_file(spec)


def parameter_counts(config: SkyworkMoeConfig) -> dict[str, int]:
    """Parameter counts computed from the config alone (``skymoe.arithmetic.parameter_counts``).

    Returns ``total``, ``embedding`` (input embedding + untied LM head), ``active`` (parameters
    one token passes through: attention, norms, router, ``top_k`` experts or the dense MLP, plus
    embeddings) and ``active_non_embedding``.
    """
    from .arithmetic import parameter_counts as counts  # it imports this module

    return counts(config)


def format_count(n: float) -> str:
    """Human-readable parameter count (``146.37B``, ``12.3M``)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if math.isfinite(n) else str(n)
