"""``python -m bench.context_parallel --quick``: weak scaling over 1 and 2 gloo ranks writes complete files,
and the bytes each rank sends stay flat while ring attention's (computed) grow with the ranks."""

import json

from bench import context_parallel

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_run_writes_results_with_flat_traffic(tmp_path):
    assert context_parallel.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "context_parallel.json").read_text())
    config = context_parallel.settings(quick=True)
    assert payload["meta"]["command"].startswith("python -m bench.context_parallel --quick")
    rows = payload["results"]
    assert [r["ranks"] for r in rows] == config["ranks"]
    for r in rows:
        assert r["total_tokens"] == r["ranks"] * config["tokens_per_rank"]
        assert r["ms"] > 0 and r["peak_mib_per_rank"] > 0 and len(r["per_rank"]) == r["ranks"]
        assert r["ring_attention_bytes_per_rank"] == 3 * (r["ranks"] - 1) * config["tokens_per_rank"] * \
            config["kv_heads"] * 2 * config["p"] * 4
    # Skyformer: the same collectives and bytes whatever the number of ranks (and tokens): m-sized buffers.
    assert len({(r["collectives"], r["bytes_sent_per_rank"]) for r in rows}) == 1
    assert rows[-1]["bytes_sent_per_rank"] < rows[-1]["ring_attention_bytes_per_rank"] / 10
    assert (tmp_path / "context_parallel.png").read_bytes().startswith(PNG_MAGIC)
    lines = (tmp_path / "context_parallel.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rows) and lines[0].startswith("ranks,total_tokens")
    assert "ring attention" in (tmp_path / "context_parallel.md").read_text()
    assert not (tmp_path / "_ranks").exists()
