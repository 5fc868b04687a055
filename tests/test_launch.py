"""train@ under a launcher: options it would silently ignore are refused with one line naming the option."""
from __future__ import annotations

import re

import pytest

from fusesoup.errors import StageError
from fusesoup.train.launch import check_launch


@pytest.mark.parametrize("env, option", [
    ({"ACCELERATE_USE_FSDP": "true"}, "--use_fsdp (FSDP)"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, "--use_deepspeed"),
    ({"ACCELERATE_USE_MEGATRON_LM": "true"}, "--use_megatron_lm"),
    ({"ACCELERATE_MIXED_PRECISION": "fp16"}, "--mixed_precision fp16"),
])
def test_a_launch_option_the_loop_does_not_run_is_refused(env, option):
    with pytest.raises(StageError, match=rf"^train: accelerate launch {re.escape(option)} is not supported"):
        check_launch(env)


def test_what_the_loop_honours_passes():
    check_launch({})
    check_launch({"ACCELERATE_USE_FSDP": "false", "ACCELERATE_MIXED_PRECISION": "bf16", "WORLD_SIZE": "2"})
    check_launch({"ACCELERATE_MIXED_PRECISION": "no"})
