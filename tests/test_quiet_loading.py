"""Issue 23: loading the demo model (or any model folder on this machine) prints nothing: no "Loading
weights" bar, no transformers/peft FutureWarning. Checked in fresh processes with every warning shown."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fwd2bot_index.model.tiny import TinySpec, save_tiny_llava

LOAD = ("from fwd2bot_index.model import Fwd2Bot; from transformers.utils import logging as l; "
        "m = Fwd2Bot.from_pretrained({name!r}, device='cpu'); "
        "assert l.is_progress_bar_enabled(), 'the bars stay on for the caller'; print('loaded')")


@pytest.mark.parametrize("which", ["demo", "folder"])
def test_loading_a_local_model_is_silent(which, tmp_path):
    name = "demo" if which == "demo" else str(save_tiny_llava(tmp_path / "tiny", TinySpec(image_size=64), seed=0))
    done = subprocess.run([sys.executable, "-W", "always", "-c", LOAD.format(name=name)], capture_output=True,
                          text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "loaded", done.stderr
    assert "Loading weights" not in done.stderr and "Warning" not in done.stderr, done.stderr
