"""The task table: the reference code's settings and our key-I grid, and how a node's preset
meets the inputs a user set."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from diffpriv_core.schedule import ddim_grid
from diffpriv_core.tasks import TASKS, preset_value, task

NODE = "Guided DDIM Sampler"


def test_the_tasks_hold_the_reference_codes_settings_and_our_key_i_inversion():
    """S_ns, tau, steps, samples and lambda_t as the reference code's notebooks run them (the
    paper gives no lambda); key-I on the task's grid, inverted by BDIA (ours; fixed_point
    mode's refinements stay at 4)."""
    anonymize, hide = TASKS["anonymize"], TASKS["hide"]
    assert (anonymize.strength, anonymize.tau, anonymize.steps, anonymize.samples) == (0.6, 0.4, 50, 4)
    assert (hide.strength, hide.tau, hide.steps, hide.samples) == (0.8, 0.6, 100, 1)
    assert anonymize.lambdas(900) == 1.0 and (hide.lambdas(900), hide.lambdas(100)) == (1.5, 2.5)
    assert (anonymize.key_i.steps, anonymize.key_i.mode, anonymize.key_i.refine) == (50, "bdia", 4)
    assert (hide.key_i.steps, hide.key_i.mode, hide.key_i.refine) == (100, "bdia", 4)
    with pytest.raises(ValueError, match="unknown task 'blur'; choose one of anonymize, hide"):
        task("blur")


def test_the_noise_starts_at_t_581_and_791_on_the_tasks_grids():
    """S_ns picks the last S_ns x steps of the grid: their first timestep lies below S_ns * T."""
    starts = {name: ddim_grid(t.steps).tail(t.strength).timesteps[0] for name, t in TASKS.items()}
    assert starts == {"anonymize": 581, "hide": 791}


def test_an_input_left_to_the_preset_takes_the_tasks_setting():
    assert preset_value(NODE, "hide", "s_ns", 0.0, 0.0, setting="strength") == 0.8
    assert preset_value(NODE, "hide", "steps", 0, 0) == 100
    assert preset_value("Embedding Scheduler", "anonymize", "tau", -1.0, -1.0) == 0.4


def test_a_preset_never_overrides_an_input_the_user_set(caplog):
    with caplog.at_level(logging.WARNING, logger="diffprivacy"):
        assert preset_value(NODE, "hide", "steps", 30, 0) == 30
        assert preset_value(NODE, "hide", "samples", 1, 0) == 1  # the preset's own value: nothing to say
    assert [r.getMessage() for r in caplog.records] == [
        "Diff-Privacy Guided DDIM Sampler: steps is set to 30, the hide preset's is 100: using 30"]
    assert preset_value("Embedding Scheduler", "hide", "tau", 0.0, -1.0) == 0.0  # tau 0 is a value, not "unset"


def test_custom_needs_every_value():
    assert preset_value(NODE, "custom", "steps", 7, 0) == 7
    with pytest.raises(ValueError, match="preset custom takes 'samples' from its input, which is left at 0"):
        preset_value(NODE, "custom", "samples", 0, 0)


def test_the_command_reads_the_task_table_without_torch():
    code = ("import sys, diffpriv_client.cli, diffpriv_client.graphs, diffpriv_core.tasks; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
