"""Every kernel in every launch configuration the wrappers can pick compiles for sm_80 and sm_90 (no GPU
needed) without register spills and within the architecture's shared memory.

Runs ``python -m triton_kernels.compile_check`` in a subprocess without TRITON_INTERPRET (conftest sets it
for the interpreter tests; interpreted kernels cannot be compiled) and checks its rows independently of the
module's own verdict.
"""

import json
import os
import subprocess
import sys

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def test_every_launch_configuration_compiles_without_spills_for_sm80_and_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    count = subprocess.run([sys.executable, "-c", "from triton_kernels import compile_check as c; "
                            "print(len(c.launches()))"], env=env, capture_output=True, text=True, check=True)
    rows_file = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, "-m", "triton_kernels.compile_check", "--json", str(rows_file)],
                            env=env, capture_output=True, text=True, timeout=900)
    assert rows_file.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(rows_file.read_text())
    assert len(rows) == 2 * int(count.stdout) > 0  # every launch, both architectures
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["spills"] == 0, f"register spill: {r}"
        assert r["shared"] <= SHARED_LIMIT[r["arch"]], f"shared memory over the sm_{r['arch']} limit: {r}"
        assert 0 < r["registers"] <= 255, r
    assert result.returncode == 0, result.stdout[-3000:]
