"""Checkpointing megatron-core 0.19's optimizers when the bf16 model holds fp32 parameters.

The StripedHyena authors keep the long/medium Hyena filters in fp32 inside a bf16 model; megatron's optimizers train
them as fp32 parameters beside the fp32 main copies of the bf16 ones, but both lose track of which optimizer
parameter is which model parameter once the two kinds are mixed.

Plain optimizer: ``Float16OptimizerWithFloat16Params.sharded_state_dict`` numbers the
optimizer's parameters by position in ``float16_groups`` only, but torch numbers them by position in the optimizer's
own param groups, which interleave the fp32 parameters: every parameter after the first fp32 one is mapped to the
wrong model tensor ("Optimizer shape (64,) does not match model shape (16, 1, 7)"), and the fp32 master copies are
zipped against the wrong ids. The replacement builds both maps in the optimizer's real order; with no fp32
parameter in the model it defers to megatron's method unchanged, so the checkpoint layout is the same as megatron's.

Distributed optimizer: ``model_param_group_index_map`` gives each model parameter its position in buffer order, but
the optimizer's param groups hold ``[*fp32 shards, *fp32-from-bf16 shards]``; every state lookup through the map
(checkpoint save and load in all three sharding formats) then reads another parameter's state ("AssertionError:
(torch.Size([1024]), 0, 64)"). The map is rebuilt in the optimizer's order after construction; without fp32
parameters the rebuilt map equals megatron's.
"""

from __future__ import annotations

_MARK = "_evo2_mixed_dtype"


def _sharded_state_dict(original):
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        if not any(self.fp32_from_fp32_groups):
            return original(self, model_sharded_state_dict, is_loading=is_loading, metadata=metadata)
        if is_loading:
            self.init_state_fn(self.optimizer, self.config)
        state_dict = self.state_dict()
        # main (fp32) copy -> its bf16/fp16 model parameter; an fp32 model parameter is its own entry.
        model_of = {id(main): model for models, mains in zip(self.float16_groups, self.fp32_from_float16_groups)
                    for model, main in zip(models, mains)}
        in_optimizer_order = [model_of.get(id(p), p) for g in self.optimizer.param_groups for p in g["params"]]
        id_to_sharded = get_param_id_to_sharded_param_map(model_sharded_state_dict, in_optimizer_order)
        # torch numbers the optimizer's parameters across its groups; the main copies' numbers, group by group:
        main_ids = [[i for i, p in zip(saved["params"], live["params"]) if id(p) in model_of]
                    for saved, live in zip(state_dict["optimizer"]["param_groups"], self.optimizer.param_groups)]
        state_dict["fp32_from_fp16_params"] = [
            [make_sharded_optimizer_tensor(id_to_sharded[i], main, prefix="optimizer.state.fp32_param")
             for i, main in zip(ids, mains)]
            for ids, mains in zip(main_ids, state_dict["fp32_from_fp16_params"])]
        step = self._extract_common_per_param_step(state_dict["optimizer"])
        optim_state_to_sharding_state(state_dict["optimizer"], id_to_sharded, exclude_keys="step")
        if step:
            state_dict["optimizer"]["state"]["common_step"] = step
        return state_dict

    setattr(sharded_state_dict, _MARK, True)
    return sharded_state_dict


def _init_with_true_group_order(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if not any(self.model_fp32_groups):
            return
        # Same order as the optimizer's param groups (``_build_model_and_main_param_groups``).
        self.model_param_group_index_map = {
            model: (g, i) for g, (fp32, fp16) in enumerate(zip(self.model_fp32_groups, self.model_float16_groups))
            for i, model in enumerate([*fp32, *fp16])}

    setattr(__init__, _MARK, True)
    return __init__


def patch_optimizers() -> None:
    """Install both replacements (idempotent)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if not getattr(Float16OptimizerWithFloat16Params.sharded_state_dict, _MARK, False):
        Float16OptimizerWithFloat16Params.sharded_state_dict = _sharded_state_dict(
            Float16OptimizerWithFloat16Params.sharded_state_dict)
    if not getattr(DistributedOptimizer.__init__, _MARK, False):
        DistributedOptimizer.__init__ = _init_with_true_group_order(DistributedOptimizer.__init__)
