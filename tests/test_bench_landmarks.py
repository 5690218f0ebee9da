"""``python -m bench.landmarks --quick``: synthetic inputs (no transformers or MiniLM needed), and the files it
writes are complete and well-formed; plus the helpers that do not need the model."""

import csv
import json
import math

import pytest

from bench import landmarks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("landmarks")
    assert landmarks.main(["--quick", "--no-progress", "--threads", "0", "--out", str(out)]) == 0
    return out, json.loads((out / "landmarks.json").read_text())  # written with allow_nan=False


def test_quick_json_structure(quick_run):
    _, payload = quick_run
    config = landmarks.settings(quick=True)
    assert set(payload) == {"meta", "results", "acceptance", "long_timing", "reference_check"}
    meta = payload["meta"]
    assert meta["command"].startswith("python -m bench.landmarks --quick")
    assert meta["settings"]["inputs"] == "synthetic" and meta["inputs"]["source"] == landmarks.SYNTHETIC_SOURCE

    rows = payload["results"]
    expected = {(layer, seeds, refine, m) for layer in config["layers"] for seeds in landmarks.SEEDS
                for refine in config["refines"] for m in config["ms"]}
    assert {(r["layer"], r["seeds"], r["refine"], r["m"]) for r in rows} == expected and len(rows) == len(expected)
    for r in rows:
        assert len(r["errors"]) == (config["draws"] if r["seeds"] == "random" else 1)
        assert all(math.isfinite(e) and 0 <= e < 2 for e in r["errors"])
        assert r["error_min"] <= r["error"] <= r["error_max"]
        assert 0 < r["fwd_ms_min"] <= r["fwd_ms"] <= r["fwd_ms_max"]

    # On clustered inputs one Lloyd step helps at the largest m (seeded, so deterministic).
    def error(layer, refine):
        return next(r["error"] for r in rows if (r["layer"], r["seeds"], r["refine"], r["m"])
                    == (layer, "random", refine, config["m_paper"]))
    for layer in config["layers"]:
        assert error(layer, 1) < error(layer, 0)

    checks = payload["acceptance"]
    assert len(checks) == 2 * len(config["layers"])
    for c in checks:
        assert c["value"] == pytest.approx(c["numerator"] / c["denominator"])
        assert c["pass"] == (c["value"] <= c["threshold"]) and c["threshold"] in (1.10, 0.80)

    long_rows = payload["long_timing"]
    assert [(r["n"], r["mode"]) for r in long_rows] == [(n, mode) for n in config["long_ns"] for mode in ("fwd", "fwd+bwd")]
    for r in long_rows:
        assert (r["paper"]["m"], r["paper"]["refine"], r["refine1"]["m"], r["refine1"]["refine"]) == (
            config["m_paper"], 0, config["m_small"], 1)
        assert len(r["paper"]["times_ms"]) == len(r["refine1"]["times_ms"]) == config["long_rounds"]
        assert r["time_ratio_refine1_over_paper"] == pytest.approx(r["refine1"]["median_ms"] / r["paper"]["median_ms"])

    check = payload["reference_check"]
    assert check["exact_max_rel_diff"] < 1e-10 and check["output_max_rel_diff"] < 1e-8
    assert check["error_rel_diff"] < 1e-8


def test_quick_csv_md_png(quick_run):
    out, payload = quick_run
    with (out / "landmarks.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == landmarks.CSV_FIELDS and len(table) == len(payload["results"])
    assert all(math.isfinite(float(row["error"])) and float(row["fwd_ms"]) > 0 for row in table)
    text = (out / "landmarks.md").read_text()
    assert text.startswith("Command: `python -m bench.landmarks --quick")
    for heading in ("**layer 0**", "**Acceptance**", "**Timing at length**", "**Reference check**"):
        assert heading in text
    data = (out / "landmarks.png").read_bytes()
    assert data[:8] == PNG_MAGIC and 1000 < len(data) < 300_000


def test_pareto_front():
    points = [(1.0, 0.5), (2.0, 0.6), (3.0, 0.3), (4.0, 0.3), (5.0, 0.1)]
    assert landmarks.pareto_front(points) == [(1.0, 0.5), (3.0, 0.3), (5.0, 0.1)]


def test_reference_text_is_prose():
    text = landmarks.reference_text()
    assert len(text) > 100_000  # far more than the 4 x 510 tokens the full run takes
    paragraphs = text.split("\n\n")
    assert not any(p.startswith((" ", "\t")) or "\n" in p for p in paragraphs)
    assert text.lower().startswith("assert statements")  # topics in sorted order: "assert" first


def test_missing_model_package_is_reported(monkeypatch):
    monkeypatch.setattr(landmarks, "MODEL_PACKAGE", "no_such_package_for_skyformer_tests")
    with pytest.raises(ModuleNotFoundError, match="bench-landmarks"):
        landmarks.minilm_model_dir()
