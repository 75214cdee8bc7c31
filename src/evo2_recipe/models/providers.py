"""Model-size registry: one provider dataclass per architecture, ``provide()`` returns the megatron ``HyenaModel``.

``HyenaModelProvider`` is a Megatron-Bridge ``TransformerConfig`` (deferred ``finalize()``) plus
``ModelProviderMixin``, so it plugs into Bridge's ``ConfigContainer``/``pretrain`` like Bridge's own GPT provider.
Sizes and their exact hyper-parameters follow spec section 1 (table 1.2 and the ARC/NV differences of 1.4).

    provider = get_provider("evo2_1b_base", vocab_size=512)
    provider.finalize()
    model = provider.provide()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from evo2_recipe.compat import megatron_fixes

megatron_fixes.install_import_guard()  # Megatron-Bridge imports need it when TE is absent; patches nothing

from megatron.bridge.models.model_provider import ModelProviderMixin  # noqa: E402
from megatron.bridge.models.transformer_config import TransformerConfig  # noqa: E402
from megatron.bridge.utils.instantiate_utils import register_allowed_target_prefix  # noqa: E402
from megatron.bridge.utils.vocab_utils import calculate_padded_vocab_size  # noqa: E402

from evo2_recipe.compat.megatron_fixes import te_spec_by_default, wgrad_accumulation_available  # noqa: E402
from evo2_recipe.models.hyena import quantization  # noqa: E402
from evo2_recipe.models.hyena.config import ATTENTION, HYENA_LONG, HYENA_MEDIUM, HYENA_SHORT  # noqa: E402
from evo2_recipe.models.hyena.model import HyenaModel  # noqa: E402
from evo2_recipe.models.hyena.mixer import keep_hyena_filters_fp32  # noqa: E402
from evo2_recipe.models.hyena.specs import get_hyena_stack_spec  # noqa: E402

# run_config.yaml names our classes in `_target_`; Bridge only instantiates allow-listed prefixes.
register_allowed_target_prefix("evo2_recipe.")

PATTERN_1B = "SDH*SDHSDH*SDHSDH*SDHSDH*"
PATTERN_7B = "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*"
PATTERN_20B = "SDH*SDHSDH*SDHSDH*SDHSDH"
PATTERN_40B = "SDH*SDHSDH*SDHSDH*SDHSDH*SDHSDH*SDH*SDHSDH*SDHSDH*"


def _normal_init(std: float) -> Callable:
    # functools.partial (not a closure) so run_config.yaml can serialize and re-instantiate it.
    return partial(torch.nn.init.normal_, mean=0.0, std=std)


@dataclass
class HyenaModelProvider(TransformerConfig, ModelProviderMixin[HyenaModel]):
    """Base Evo 2 / StripedHyena 2 configuration (spec section 1.3 defaults)."""

    num_layers: int = 4
    hidden_size: int = 4096
    ffn_hidden_size: int = 11008
    num_attention_heads: int = 32
    hybrid_override_pattern: str = "SDH*"
    num_groups_hyena: int = 4096
    num_groups_hyena_medium: int = 256
    num_groups_hyena_short: int = 256
    seq_length: int = 8192
    vocab_size: int | None = None
    make_vocab_size_divisible_by: int = 8
    should_pad_vocab: bool = False
    share_embeddings_and_output_weights: bool = True
    add_bias_output: bool = False  # a zero-initialised bias on the output layer (reference --add-bias-output)
    to_upper: str = "normalized_weighted"
    # precision / numerics
    params_dtype: torch.dtype = torch.bfloat16
    bf16: bool = True
    fp16: bool = False
    normalization: str = "RMSNorm"
    layernorm_epsilon: float = 1e-6
    gated_linear_unit: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    fp32_residual_connection: bool = True
    # positions
    position_embedding_type: str = "rope"
    rotary_percent: float = 1.0
    rotary_base: int = 10000
    seq_len_interpolation_factor: float | None = None
    apply_rope_fusion: bool = True
    # fusions / recompute
    bias_activation_fusion: bool = True
    bias_dropout_fusion: bool = True
    masked_softmax_fusion: bool = True
    cross_entropy_loss_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    recompute_granularity: str | None = "full"
    recompute_method: str | None = "uniform"
    recompute_num_layers: int | None = 4
    # Hyena switches (spec 1.3 / 1.4)
    use_te: bool | None = None  # None: Transformer Engine whenever it imports and a GPU is visible
    use_short_conv_bias: bool = False
    remove_activation_post_first_layer: bool = True
    add_attn_proj_bias: bool = True
    hyena_filter_no_wd: bool = True  # no weight decay on the modal filters (p, R, gamma); see recipe.py
    vortex_style_fp8: bool = False
    use_fused_hyena_kernels: bool | None = None  # None: the measured-faster kernels on CUDA; True: all; False: none
    use_subquadratic_ops: bool = False  # NVIDIA's subquadratic-ops-torch where it serves (kernels/subquadratic.py)
    embedding_init_method_std: float | None = 0.02
    use_cpu_initialization: bool = False

    def finalize(self) -> None:
        if self.use_te is None:
            self.use_te = te_spec_by_default()
        if not self.use_te:  # these fusions need TE or Apex kernels
            self.apply_rope_fusion = False
            self.masked_softmax_fusion = False
            self.persist_layer_norm = False
            # megatron's own linears take it from Apex or compat fix 7 (torch's addmm into main_grad)
            self.gradient_accumulation_fusion &= wgrad_accumulation_available()
        if self.remove_activation_post_first_layer:
            self.bias_activation_fusion = False  # ARC layer 0 uses the exact erf GELU
        quantization.require_transformer_engine(self)  # FP8/FP4 never silently run in bf16
        H, N = self.hidden_size, self.num_layers
        self.init_method = _normal_init(math.sqrt(2 / (5 * H)))  # small_init
        self.output_layer_init_method = _normal_init(2 / (N * math.sqrt(H)))  # wang_init
        self.embedding_init_method = _normal_init(self.embedding_init_method_std or 0.02)
        if self.kv_channels is None:
            self.kv_channels = H // self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        super().finalize()

    def provide(self, pre_process=None, post_process=None, vp_stage=None) -> HyenaModel:
        from megatron.core.process_groups_config import ProcessGroupCollection

        if vp_stage is not None or self.virtual_pipeline_model_parallel_size:
            raise ValueError("virtual pipeline parallelism is not supported for Hyena models")
        if self.vocab_size is None:
            raise ValueError("vocab_size is not set; set it from the tokenizer (256 or 512) before provide()")
        if self.init_method is None or self.kv_channels is None:
            self.finalize()
        vocab = self.vocab_size
        if self.should_pad_vocab:
            vocab = calculate_padded_vocab_size(vocab, self.make_vocab_size_divisible_by,
                                                self.tensor_model_parallel_size)
        # Bridge's provide_distributed_model hands its process groups over as ``_pg_collection``; the model uses
        # those (parallel_state's own groups when called directly).
        pg = getattr(self, "_pg_collection", None) or ProcessGroupCollection.use_mpu_process_groups()
        stage, stages = (pg.pp.rank(), pg.pp.size()) if pg.pp is not None else (0, 1)
        if pre_process is None:
            pre_process = stage == 0
        if post_process is None:
            post_process = stage == stages - 1
        model = HyenaModel(self, get_hyena_stack_spec(self.use_te), vocab_size=vocab,
                           max_sequence_length=self.seq_length, pre_process=pre_process, post_process=post_process,
                           share_embeddings_and_output_weights=self.share_embeddings_and_output_weights,
                           to_upper=self.to_upper, pg_collection=pg)
        # Long/medium filters stay fp32 through the Float16Module cast, in training as in inference.
        return keep_hyena_filters_fp32(model)

    def _get_num_floating_point_operations(self, batch_size: int) -> float:
        """Hook read by Megatron-Bridge's throughput logging (TFLOP/s/GPU)."""
        return num_floating_point_operations(self, batch_size)

    def layer_counts(self) -> dict[str, int]:
        p = self.hybrid_override_pattern
        return {k: p.count(k) for k in (HYENA_SHORT, HYENA_MEDIUM, HYENA_LONG, ATTENTION)}


# ---- sizes (spec table 1.2) --------------------------------------------------------------------------------------
_ARC_COMMON = dict(hyena_init_method="small_init", hyena_output_layer_init_method="wang_init")
_NV = dict(remove_activation_post_first_layer=False, add_attn_proj_bias=False, use_short_conv_bias=True)
_1B = dict(num_layers=25, hidden_size=1920, ffn_hidden_size=5120, num_attention_heads=15,
           num_groups_hyena=1920, num_groups_hyena_medium=128, num_groups_hyena_short=128,
           hybrid_override_pattern=PATTERN_1B, recompute_num_layers=5)
_7B = dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
           num_groups_hyena=4096, num_groups_hyena_medium=256, num_groups_hyena_short=256,
           hybrid_override_pattern=PATTERN_7B, recompute_num_layers=4)
_40B = dict(num_layers=50, hidden_size=8192, ffn_hidden_size=21888, num_attention_heads=64,
            num_groups_hyena=8192, num_groups_hyena_medium=512, num_groups_hyena_short=512,
            hybrid_override_pattern=PATTERN_40B, rotary_base=1_000_000, recompute_num_layers=2)
_1M = dict(seq_length=1_048_576, seq_len_interpolation_factor=128)
_TEST = dict(num_layers=4, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32, num_groups_hyena=4096,
             num_groups_hyena_medium=256, num_groups_hyena_short=256, hybrid_override_pattern="SDH*",
             recompute_num_layers=2)

MODEL_SIZES: dict[str, dict] = {
    "evo2_1b_base": _1B,
    "evo2_7b_base": _7B,
    "evo2_7b": {**_7B, "ffn_hidden_size": 11264, **_1M},
    "evo2_20b": {**_40B, "num_layers": 24, "ffn_hidden_size": 22528, "hybrid_override_pattern": PATTERN_20B, **_1M},
    "evo2_40b_base": _40B,
    "evo2_40b": {**_40B, "ffn_hidden_size": 22528, **_1M},
    "striped_hyena_1b_nv": {**_1B, **_NV},
    "striped_hyena_7b_nv": {**_7B, "ffn_hidden_size": 11264, "rotary_base": 1_000_000, **_NV},
    "striped_hyena_40b_nv": {**_40B, "ffn_hidden_size": 22528, **_NV},
    "striped_hyena_test": _TEST,
    "striped_hyena_test_nv": {**_TEST, **_NV},
    "striped_hyena_1b_nv_parallel": {**_1B, **_NV, "hidden_size": 2048, "num_attention_heads": 16,
                                     "num_groups_hyena": 2048, "share_embeddings_and_output_weights": False,
                                     "embedding_init_method_std": 1.0},
    # Ours: a CPU-sized model covering every layer type, for tests and the quick start.
    "striped_hyena_tiny": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                               num_groups_hyena=64, num_groups_hyena_medium=16, num_groups_hyena_short=16,
                               hybrid_override_pattern="SDH*", seq_length=1024, recompute_granularity=None,
                               recompute_method=None, recompute_num_layers=None),
    "striped_hyena_tiny_nv": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                                  num_groups_hyena=64, num_groups_hyena_medium=16, num_groups_hyena_short=16,
                                  hybrid_override_pattern="SDH*", seq_length=1024, recompute_granularity=None,
                                  recompute_method=None, recompute_num_layers=None, **_NV),
}
REFERENCE_SIZES = [k for k in MODEL_SIZES if not k.startswith("striped_hyena_tiny")]
_PROVIDER_ONLY = {"hyena_init_method", "hyena_output_layer_init_method"}


def get_provider(name: str, **overrides) -> HyenaModelProvider:
    """Provider for a registered size; ``overrides`` must be existing fields (a typo raises)."""
    if name not in MODEL_SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of: {', '.join(MODEL_SIZES)}")
    fields = {f.name for f in dataclasses.fields(HyenaModelProvider)}
    values = {k: v for k, v in {**_ARC_COMMON, **MODEL_SIZES[name], **overrides}.items() if k not in _PROVIDER_ONLY}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown HyenaModelProvider field(s) {unknown} for {name!r}")
    return HyenaModelProvider(**values)


def num_floating_point_operations(provider: HyenaModelProvider, batch_size: int, seq_length: int | None = None,
                                  vocab_size: int | None = None) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward), spec section 1.6."""
    B, L = batch_size, seq_length or provider.seq_length
    H, F, N, V = provider.hidden_size, provider.ffn_hidden_size, provider.num_layers, vocab_size or provider.vocab_size
    c = provider.layer_counts()
    S, D, Hn, A = c[HYENA_SHORT], c[HYENA_MEDIUM], c[HYENA_LONG], c[ATTENTION]
    forward = (2 * B * L * H * V
               + N * (6 * B * L * H * H + 2 * B * L * H * H + 6 * B * L * F * H)
               + A * 4 * B * H * L * L
               + (S + D + Hn) * 6 * B * L * 3 * H
               + S * 2 * B * L * 7 * H
               + D * 2 * B * L * 128 * H
               + Hn * 10 * B * L * math.log2(L) * H)
    return 3.0 * forward
