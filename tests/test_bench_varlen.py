"""``python -m bench.varlen --quick``: the files it writes are complete and well-formed, and the packed call
matches the padded one on the valid rows when both use the same landmarks; plus the layout helpers."""

import csv
import json
import math
import statistics

import pytest
import torch

from bench import varlen

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("varlen")
    assert varlen.main(["--quick", "--no-progress", "--threads", "0", "--out", str(out)]) == 0
    return out, json.loads((out / "varlen.json").read_text())  # written with allow_nan=False


def test_quick_json_structure(quick_run):
    _, payload = quick_run
    config = varlen.settings(quick=True)
    assert set(payload) == {"meta", "results"}
    meta = payload["meta"]
    assert meta["command"].startswith("python -m bench.varlen --quick")
    assert meta["settings"] == config and "log-uniform" in meta["distribution"]

    rows = payload["results"]
    assert [r["config"] for r in rows] == [c["name"] for c in config["configs"]]
    for r, c in zip(rows, config["configs"]):
        lengths = r["lengths"]
        assert len(lengths) == r["num_seqs"] == c["num_seqs"] and lengths[-1] == c["max_len"]
        assert all(c["min_len"] <= n <= c["max_len"] for n in lengths)
        assert r["total_tokens"] == sum(lengths) and r["padded_rows"] == r["num_seqs"] * max(lengths)
        assert r["padding_ratio"] == pytest.approx(r["padded_rows"] / r["total_tokens"])
        assert set(r["modes"]) == set(varlen.MODES)
        for mode in varlen.MODES:
            m = r["modes"][mode]
            for layout in varlen.LAYOUTS:
                times = m[f"{layout}_times_ms"]
                assert len(times) == config["rounds"] and all(t > 0 and math.isfinite(t) for t in times)
                assert m[f"{layout}_ms"] == pytest.approx(statistics.median(times))
                assert m[f"{layout}_peak_mib"] > 0
            assert m["time_ratio"] == pytest.approx(m["padded_ms"] / m["packed_ms"])
            assert m["memory_ratio"] == pytest.approx(m["padded_peak_mib"] / m["packed_peak_mib"])

        check = r["correctness"]
        assert check["pass"] is True
        for name in ("out", "dq", "dk", "dv"):
            assert check[name]["max_abs"] > 0 and check[name]["rel"] <= check["tolerance_rel"]
        assert check["padded_key_grad_max_abs"] == 0.0


def test_quick_csv_md_png(quick_run):
    out, payload = quick_run
    with (out / "varlen.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == varlen.CSV_FIELDS
    assert [(row["config"], row["mode"]) for row in table] == [(r["config"], mode) for r in payload["results"]
                                                                 for mode in varlen.MODES]
    assert all(float(row["time_ratio"]) > 0 and float(row["memory_ratio"]) > 0 for row in table)
    text = (out / "varlen.md").read_text()
    assert text.startswith("Command: `python -m bench.varlen --quick")
    for heading in ("| config | mode |", "**Lengths**", "**Correctness**"):
        assert heading in text
    assert "FAIL" not in text
    data = (out / "varlen.png").read_bytes()
    assert data[:8] == PNG_MAGIC and 1000 < len(data) < 300_000


def test_lengths_are_seeded_and_bounded():
    lengths = varlen.draw_lengths(12, 64, 16384, seed=0)
    assert lengths == varlen.draw_lengths(12, 64, 16384, seed=0) and lengths[-1] == 16384
    assert all(64 <= n <= 16384 for n in lengths)


def test_padding_round_trip_and_landmark_conversion():
    lengths = [3, 1, 4]
    seq, pos, mask = varlen.pad_index(lengths)
    x = torch.arange(8 * 2 * 1, dtype=torch.float32).reshape(8, 2, 1)
    padded = varlen.to_padded(x, seq, pos, 3, 4)
    assert padded.shape == (3, 2, 4, 1)
    assert torch.equal(varlen.from_padded(padded, seq, pos), x)
    assert torch.equal(padded.transpose(1, 2)[~mask], torch.zeros(12 - 8, 2, 1))
    # Rows of each sequence's own [q_s; k_s] -> rows of the padded [q; k] with n_q = 4.
    packed_idx = torch.tensor([[0, 2, 3, 5], [0, 0, 1, 1], [3, 4, 7, 0]])
    expected = torch.tensor([[0, 2, 4, 6], [0, 0, 4, 4], [3, 4, 7, 0]])
    assert torch.equal(varlen.padded_landmark_indices(packed_idx, lengths, 4), expected)
