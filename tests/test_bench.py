"""The benchmark code: the naive baseline's agreement with the library, and the quick modes of
``python -m bench`` and ``python -m bench.approx`` (outputs exist, are well-formed, and make sense)."""

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from bench import approx, progress, throughput
from bench.naive_skyformer import naive_skyformer_attention
from bench.report import RESULT_FIELDS
from skyformer_ext import sample_landmarks, skyformer_attention

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("masked", [False, True])
def test_naive_baseline_matches_skyformer(dtype, tolerance, masked):
    """Same landmark indices -> the materialising baseline and our implementation agree to rounding
    (odd sizes, n_q != n_k, GQA, p_v != p, key padding)."""
    q = torch.randn(2, 4, 97, 80, dtype=dtype)
    k = torch.randn(2, 2, 61, 80, dtype=dtype)
    v = torch.randn(2, 2, 61, 48, dtype=dtype)
    mask = torch.rand(2, 61) > 0.3 if masked else None
    idx = sample_landmarks(2, 97, 61, 24, attn_mask=mask)
    expected = skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="reference")
    naive = naive_skyformer_attention(q, k, v, idx, attn_mask=mask)
    ours = skyformer_attention(q, k, v, landmark_indices=idx, attn_mask=mask, backend="torch")
    scale = expected.abs().max().item()
    assert naive.shape == expected.shape and naive.dtype == dtype
    assert (naive - expected).abs().max().item() <= tolerance * scale
    assert (naive - ours).abs().max().item() <= tolerance * scale


def test_naive_baseline_is_not_trivially_equal():
    """A different landmark set gives a different answer (the agreement above is not vacuous)."""
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64) for _ in range(3))
    first = naive_skyformer_attention(q, k, v, sample_landmarks(1, 64, 64, 8, generator=torch.Generator().manual_seed(1)))
    second = skyformer_attention(q, k, v, landmark_indices=sample_landmarks(
        1, 64, 64, 8, generator=torch.Generator().manual_seed(2)), backend="torch")
    assert (first - second).abs().max().item() > 1e-6


def _check_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and 1000 < len(data) < 200_000, path


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_bench_quick_writes_well_formed_results(tmp_path, device):
    assert throughput.main(["--quick", "--no-progress", "--device", device, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "throughput.json").read_text())  # allow_nan=False when written
    assert set(payload) == {"meta", "suites", "results", "acceptance"}
    assert {"command", "device", "device_model", "torch", "started_utc", "wall_s"} <= set(payload["meta"])
    rows = payload["results"]
    suites = {s["name"] for s in payload["suites"]}
    assert len(suites) == 2 and {r["suite"] for r in rows} == suites
    assert len(rows) == sum(len(s["sizes"]) * len(s["methods"]) for s in payload["suites"])
    for row in rows:
        assert set(RESULT_FIELDS) <= set(row)
        assert row["status"] in ("ok", "skipped", "oom", "error", "unavailable"), row
    ok = [r for r in rows if r["status"] == "ok"]
    # Skyformer (every backend that suits the device) and the naive baseline run at the quick sizes, forward
    # and backward; on CPU so do kernelized[torch] and SDPA; on CUDA at least one SDPA backend (flash has no
    # float32).
    must_run = [r for r in rows if r["family"] in ("skyformer", "naive_skyformer")
                and (device == "cuda" or "[triton]" not in r["method"])]
    assert must_run and all(r["status"] == "ok" for r in must_run), [r for r in must_run if r["status"] != "ok"]
    if device == "cpu":
        assert {r["method"] for r in ok} == {"skyformer[torch]", "naive_skyformer", "kernelized[torch]", "sdpa"}
    else:
        assert any(r["family"] == "sdpa" for r in ok)
    for row in ok:
        assert math.isfinite(row["time_ms"]) and row["time_ms"] > 0
        assert row["times_ms"] and min(row["times_ms"]) <= row["time_ms"] <= max(row["times_ms"])
        assert row["peak_mib"] is not None and row["peak_mib"] > 0
        assert row["sdpa_reference"] in throughput.SDPA_PREFERENCE and row["speedup_vs_sdpa"] > 0
        assert (row["bandwidth_gbs"] > 0) if device == "cuda" else row["bandwidth_gbs"] is None
    for row in ok:
        if row["method"] == row["sdpa_reference"]:
            assert row["speedup_vs_sdpa"] == pytest.approx(1.0)

    with (tmp_path / "throughput.csv").open() as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == RESULT_FIELDS
        assert len(list(reader)) == len(rows)
    assert "| method |" in (tmp_path / "throughput.md").read_text()
    for suite in suites:
        _check_png(tmp_path / f"time_vs_n_{suite}.png")
        _check_png(tmp_path / f"memory_vs_n_{suite}.png")


def test_bench_skips_points_predicted_too_slow(tmp_path):
    """SDPA at 16k predicted from n=64 (quadratic growth) exceeds a 0.5 s cap: skipped, estimate kept."""
    argv = ["--device", "cpu", "--methods", "sdpa", "--n", "64", "16384", "--heads", "1", "--p", "16", "--cap-s", "0.5",
            "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    rows = json.loads((tmp_path / "throughput.json").read_text())["results"]
    small, large = sorted(rows, key=lambda r: r["n"])
    assert small["status"] == "ok"
    assert large["status"] == "skipped" and large["time_ms"] is None
    assert large["est_time_ms"] == pytest.approx(small["time_ms"] * (16384 / 64) ** 2)
    assert "est." in large["note"]


def test_speedup_against_estimated_sdpa_is_marked():
    def row(method, n, status, ms=None, est=None):
        return {"suite": "s", "method": method, "n": n, "status": status, "time_ms": ms, "est_time_ms": est}

    rows = [row("sdpa", 1024, "ok", ms=50.0), row("skyformer[torch]", 1024, "ok", ms=10.0),
            row("sdpa", 2048, "skipped", est=200.0), row("skyformer[torch]", 2048, "ok", ms=20.0)]
    throughput.add_speedups(rows)
    assert rows[1]["speedup_vs_sdpa"] == pytest.approx(5.0) and rows[1]["speedup_estimated"] is False
    assert rows[3]["speedup_vs_sdpa"] == pytest.approx(10.0) and rows[3]["speedup_estimated"] is True
    assert rows[2].get("speedup_vs_sdpa") is None


def test_acceptance_ratios_are_computed_from_the_default_suite():
    def row(method, n, ms, mib):
        return {"suite": "fwd_b1h8_p64_m128_fp32", "method": method, "n": n, "status": "ok", "time_ms": ms,
                "peak_mib": mib}

    rows = [row("skyformer[torch]", 16384, 100.0, 10.0), row("skyformer[torch]", 32768, 230.0, 20.0),
            row("naive_skyformer", 16384, 400.0, 50.0), row("sdpa", 16384, 3000.0, 1.0)]
    checks = {c["check"]: c for c in throughput.acceptance(rows)}
    assert checks["skyformer[torch] vs SDPA speed-up at n=16k"]["value"] == pytest.approx(30.0)
    assert checks["skyformer[torch] vs SDPA speed-up at n=16k"]["passed"] is True
    assert checks["skyformer[torch] vs naive speed-up at n=16k"]["passed"] is False   # 4x < 5x
    assert checks["skyformer[torch] / naive peak memory at n=16k"]["value"] == pytest.approx(0.2)
    assert checks["skyformer[torch] t(32k) / t(16k)"]["passed"] is False               # 2.3 > 2.2
    assert throughput.acceptance([]) == []


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_tqdm", None)
    bar = progress.progress(2, "bench")
    bar.set_postfix_str("fwd sdpa n=1k")
    bar.update(1)
    bar.set_postfix_str("fwd sdpa n=2k")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "bench [0/2" in err and "fwd sdpa n=2k" in err and "done: 2/2" in err


def test_approx_quick_report(tmp_path):
    assert approx.main(["--quick", "--no-progress", "--threads", "0", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "approx.json").read_text())
    assert set(payload) == {"meta", "results"}
    rows = payload["results"]
    config = approx.settings(quick=True)
    for row in rows:
        assert len(row["errors"]) == config["seeds"]
        assert all(math.isfinite(e) and e >= 0 for e in row["errors"])
        assert row["min"] <= row["mean"] <= row["max"]
    variants = {(r["landmarks"], r["inverse"]) for r in rows if r["method"] == "skyformer"}
    assert variants == set(approx.VARIANTS)
    assert {r["input"] for r in rows} == set(approx.INPUTS)
    assert any(r["method"] == approx.NYSTROMFORMER for r in rows)
    # On i.i.d. Gaussian inputs the error falls as m grows, for every landmark strategy and inverse.
    for landmarks, inverse in approx.VARIANTS:
        curve = sorted((r["m"], r["mean"]) for r in rows if r["input"] == "gaussian" and r["sweep"] == "m"
                       and r["method"] == "skyformer" and r["landmarks"] == landmarks and r["inverse"] == inverse)
        assert [m for m, _ in curve] == config["ms"]
        errors = [e for _, e in curve]
        assert all(a > b for a, b in zip(errors, errors[1:])), (landmarks, inverse, errors)
    assert (tmp_path / "approx.csv").read_text().startswith("input,sweep,method")
    assert "error vs m" in (tmp_path / "approx.md").read_text()
    _check_png(tmp_path / "approx.png")


def test_exact_references_of_the_approx_report():
    """The chunked exact attentions used as ground truth match the library's materialising reference and
    plain softmax attention; Nystromformer with m = n landmarks (segments of one row) is exact softmax once
    its iterative pseudo-inverse has converged."""
    from skyformer_ext import reference

    q, k, v = (torch.randn(1, 2, 2100, 16, dtype=torch.float64) for _ in range(3))  # > one query chunk
    assert torch.allclose(approx.exact_kernelized(q, k, v), reference.kernelized_attention(q, k, v), atol=1e-12)
    softmax = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(approx.exact_softmax(q, k, v), softmax, atol=1e-12)
    small = tuple(t[:, :, :24] for t in (q, k, v))
    exact = approx.exact_softmax(*small)
    converged = approx.nystromformer_attention(*small, num_landmarks=24, pinv_iterations=40)
    assert max(approx.relative_spectral_errors(converged, exact)) < 1e-8
    paper = approx.nystromformer_attention(*small, num_landmarks=24)  # 6 iterations: close, not exact
    assert 1e-8 < max(approx.relative_spectral_errors(paper, exact)) < 0.2


def test_gpu_check_script_parses():
    script = Path(throughput.__file__).parent / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_backends_are_discovered_and_unsuitable_ones_reported(tmp_path, monkeypatch):
    """A backend added to skyformer_ext.api.BACKENDS appears as a method by itself; on CPU a Triton one is
    reported unavailable instead of failing the run."""
    from skyformer_ext import api

    monkeypatch.setattr(api, "BACKENDS", api.BACKENDS + ("triton",))
    argv = ["--device", "cpu", "--methods", "skyformer[triton]", "skyformer[torch]", "--n", "64", "--heads", "1",
            "--p", "16", "--m", "8", "--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert throughput.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "throughput.json").read_text())["results"]}
    assert rows["skyformer[triton]"]["status"] == "unavailable" and "CUDA" in rows["skyformer[triton]"]["note"]
    assert rows["skyformer[torch]"]["status"] == "ok"


def test_gpu_check_brings_everything_back_in_out(tmp_path):
    """The device machine returns at most 8 files from $OUT, at most 2 folders deep: the script's CPU dry run
    (install, pytest, launch counts, profile and benchmark skipped, so it takes seconds) leaves its files
    directly in $OUT, the results folder packed in one tarball."""
    import os
    import sys
    import tarfile

    script = Path(throughput.__file__).parent / "gpu_check.sh"
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_DEVICE="cpu",
               GPU_CHECK_SKIP="install pytest launches profile benchmark")
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert {"gpu_check.log", "gpu_check_summary.txt", "versions.txt"} <= {p.name for p in files}
    assert "versions: ok" in (out / "gpu_check_summary.txt").read_text()
    (tarball,) = [p for p in files if p.name.endswith(".tar.gz")]
    device = tarball.name[len("results_"):-len(".tar.gz")]
    with tarfile.open(tarball) as archive:
        members = set(archive.getnames())
    folder = f"gpu_check_{device}"  # the dry run's results folder (bench/results/_scratch/gpu_check_<device>)
    assert {f"{folder}/versions.txt", f"{folder}/gpu_check.log", f"{folder}/gpu_check_summary.txt"} <= members
