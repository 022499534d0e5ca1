"""The layering the code relies on: inference (megacontext.runtime and what it needs) never imports training
or evaluation code, and sampling, stop tokens and stream decoding exist once."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APART = ("megacontext.training", "megacontext.eval", "scripts")  # packages inference must not load

PROBE = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.startswith({apart!r}))))
"""


def loaded_apart(module):
    """The training / evaluation / script modules a fresh interpreter holds after importing `module`."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(module=module, apart=APART)], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["megacontext.runtime", "megacontext.focus", "megacontext.checkpoint",
                                    "megacontext.memory_store", "nanochat.engine"])
def test_inference_imports_no_training_or_evaluation_code(module):
    assert loaded_apart(module) == []


def test_the_probe_sees_training_code_when_it_is_imported():
    assert "megacontext.training.objective" in loaded_apart("megacontext.training.trainer")


def source_files():
    for top in ("nanochat", "megacontext", "scripts", "tasks", "dev"):
        for d, _, names in os.walk(os.path.join(ROOT, top)):
            yield from (os.path.join(d, n) for n in names if n.endswith(".py"))


@pytest.mark.parametrize("what, pattern, home", [
    ("sampling", r"torch\.multinomial\(", "nanochat/engine.py"),
    ("stop tokens", r"encode_special\([\"']<\|assistant_end\|>[\"']\)\)?\s*$|stops\.add\(", "nanochat/tokenizer.py"),
    ("stream decoding", r"\\ufffd", "nanochat/tokenizer.py"),
])
def test_one_copy_of_sampling_stop_tokens_and_stream_decoding(what, pattern, home):
    where = sorted({os.path.relpath(p, ROOT) for p in source_files()
                    if re.search(pattern, open(p, encoding="utf-8").read(), re.M)})
    assert where == [home], f"{what} is implemented in {where}, expected only in {home}"


def test_every_source_file_stays_under_600_lines():
    long = {os.path.relpath(p, ROOT): n for p in source_files()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) >= 600}
    assert not long, f"split these by concept: {long}"
