"""The training/eval step plugged into Megatron-Bridge's ``pretrain``: batch -> Hyena per-token loss -> masked sum."""

from __future__ import annotations

from functools import partial

from megatron.bridge.training.gpt_step import get_batch
from megatron.bridge.training.losses import masked_next_token_loss
from megatron.bridge.training.utils.pg_utils import get_pg_collection
from megatron.core.utils import get_model_config


def hyena_forward_step(state, data_iterator, model, return_schedule_plan: bool = False):
    """Fetch a (CP-zigzag-sliced) batch, run the model with labels, return ``(per_token_loss, loss_fn)``."""
    del return_schedule_plan
    get_model_config(model)
    timers = state.timers
    timers("batch-generator", log_level=2).start()
    tokens, labels, loss_mask, _attention_mask, position_ids, _packed = get_batch(
        data_iterator, state.cfg, pg_collection=get_pg_collection(model))
    timers("batch-generator").stop()
    output = model(input_ids=tokens, position_ids=position_ids, attention_mask=None, labels=labels,
                   loss_mask=loss_mask)
    rerun = state.cfg.rerun_state_machine
    return output, partial(masked_next_token_loss, loss_mask, check_for_nan_in_loss=rerun.check_for_nan_in_loss,
                           check_for_spiky_loss=rerun.check_for_spiky_loss)
