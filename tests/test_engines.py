"""Engines on a CPU-only machine: TensorRT-RTX builds, ONNX Runtime runs, bench, and every refusal."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokenfuse.cli import main
from tokenfuse.engines import bench as bench_module
from tokenfuse.engines.build import build_engine, parse_batch, sidecar_path
from tokenfuse.engines.runtime import load
from tokenfuse.exporter.errors import UsageError

pytestmark = pytest.mark.xdist_group("vit-ti")  # one pytest-xdist worker makes the shared ViT-Ti export and engine once


@pytest.fixture(scope="module")
def tiny(shared_exports):
    """A small ViT exported merged (pitome r=0.9), with its manifest (conftest's shared export)."""
    return shared_exports.get("vit-ti", "pitome")[0]


@pytest.fixture(scope="module")
def engine(shared_exports):
    """The ViT-Ti tome export built for batch 1:2:4 with a timing-cache path given (conftest's shared engine)."""
    return shared_exports.engine("vit-ti", "tome")


def test_build_writes_engine_sidecar_and_timing_cache(shared_exports, engine):
    out, sidecar = engine
    assert out.stat().st_size > 1_000_000
    # TensorRT-RTX has no timing cache (its cache calls are no-ops); full TensorRT writes one
    assert on_disk_timing(out) is None and not (out.parent / "timing.cache").exists()
    on_disk = json.loads(sidecar_path(out).read_text())
    assert on_disk == sidecar
    assert on_disk["tensorrt"]["flavour"] == "TensorRT-RTX" and on_disk["tensorrt"]["version"]
    assert on_disk["batch_profile"] == {"min": 1, "opt": 2, "max": 4}
    assert "SM80" in on_disk["target"]["compute_capabilities"]
    assert on_disk["plugin_library"] is None
    names = {b["name"]: b for b in on_disk["bindings"]}
    assert names["pixel_values"]["io"] == "input" and names["pixel_values"]["shape"] == [-1, 3, 224, 224]
    assert names["logits"]["io"] == "output" and names["last_hidden_state"]["shape"] == [-1, 60, 192]
    assert on_disk["export_manifest"] == json.loads(shared_exports.get("vit-ti", "tome")[0].with_suffix(".json").read_text())


def on_disk_timing(engine_path):
    return json.loads(sidecar_path(engine_path).read_text())["timing_cache"]


@pytest.mark.parametrize("text, expected", [("1:8:32", (1, 8, 32)), ("4", (4, 4, 4))])
def test_parse_batch(text, expected):
    assert parse_batch(text) == expected


@pytest.mark.parametrize("text", ["8:1:32", "0:1:2", "a:b:c", "1:2"])
def test_parse_batch_refuses(text):
    with pytest.raises(UsageError):
        parse_batch(text)


def test_build_refusals(tiny, tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "x.engine", log=lambda *_: None)
    with pytest.raises(UsageError, match="--plugins"):
        build_engine(tiny, tmp_path / "x.engine", plugins=str(tmp_path / "nope.so"), log=lambda *_: None)
    assert not (tmp_path / "x.engine").exists()


def test_onnx_runner_runs_and_checks_inputs(tiny):
    runner = load(tiny)
    pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    out = runner.run({"pixel_values": pixels})
    assert out["logits"].shape == (2, 1000) and out["token_sizes"].shape == (2, 60, 1)
    assert out["token_sizes"].sum(axis=(1, 2)).tolist() == [197.0, 197.0]
    import torch

    again = runner.run({"pixel_values": torch.from_numpy(pixels)})  # torch in, same numbers out
    assert np.array_equal(again["logits"], out["logits"])
    with pytest.raises(UsageError, match="missing input"):
        runner.run({})
    with pytest.raises(UsageError, match="expected"):
        runner.run({"pixel_values": pixels[:, :, :100]})


def test_engine_runner_refusals_on_a_cpu_machine(engine, tmp_path):
    out, sidecar = engine
    with pytest.raises(UsageError, match="no NVIDIA GPU|has none"):
        load(out)
    corrupt = tmp_path / "corrupt.engine"
    corrupt.write_bytes(b"\0garbage" * 1000)
    sidecar_path(corrupt).write_text(json.dumps(sidecar))
    with pytest.raises(UsageError, match="not a valid"):
        load(corrupt)
    old = tmp_path / "old.engine"
    old.write_bytes(out.read_bytes())
    sidecar_path(old).write_text(json.dumps({**sidecar, "tensorrt": {**sidecar["tensorrt"], "version": "9.0.0"}}))
    with pytest.raises(UsageError, match="rebuild it with tokenfuse build"):
        load(old)
    lonely = tmp_path / "lonely.engine"
    lonely.write_bytes(out.read_bytes())
    with pytest.raises(UsageError, match="no sidecar"):
        load(lonely)
    needs_plugin = tmp_path / "plugin.engine"
    needs_plugin.write_bytes(out.read_bytes())
    sidecar_path(needs_plugin).write_text(json.dumps({**sidecar, "plugin_library": {"path": "/nope/libx.so", "sha256": "ab" * 32}}))
    with pytest.raises(UsageError, match="plugin library"):
        load(needs_plugin)


def test_bench_exports_the_baseline_and_reports_against_the_flops_ideal(tiny, tmp_path):
    report = bench_module.bench(tiny, batches=(1, 2), min_rounds=3, max_seconds=1, log=lambda *_: None)
    manifest = json.loads(tiny.with_suffix(".json").read_text())
    assert report["method"] == "pitome" and report["flops_ratio"] == manifest["budget"]["flops_ratio"] < 1
    assert [row["batch"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["merged"]["runs"] == row["baseline"]["runs"] >= 3
        assert row["merged"]["p50_ms"] <= row["merged"]["p90_ms"] <= row["merged"]["p99_ms"]
        # measured (resident-set growth of one arena-free call), not compared: on a tiny model the
        # allocator's noise is as large as the difference
        assert row["merged"]["peak_call_mib"] >= 0 and row["baseline"]["peak_call_mib"] >= 0
        assert row["flops_ideal_speedup"] == pytest.approx(1 / report["flops_ratio"])
        assert row["realised_fraction_of_ideal"] == pytest.approx(row["speedup"] / row["flops_ideal_speedup"])
    table = bench_module.markdown(report)
    assert table.count("\n| ") == 3 and "FLOPs ideal" in table
    bench_module.plot(report, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_profile_splits_the_time_by_op_type(tiny, tmp_path, capsys):
    """bench --profile: both graphs' per-operator times; the op types only the merged graph has are
    the merge's own; --profile takes no timing-only flag."""
    import onnx

    out = tmp_path / "profile.json"
    assert main(["bench", str(tiny), "--profile", "--batch", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    merged, baseline = result["merged"], result["baseline"]
    assert result["batch"] == 2 and result["method"] == "pitome" and merged["total_ms"] > 0 and baseline["total_ms"] > 0
    own = set(merged["ops"]) - set(baseline["ops"])
    merge_ops = {node.op_type for node in onnx.load(str(tiny)).graph.node} - {"MatMul", "Add", "Mul", "Softmax", "Reshape", "Transpose"}
    assert own & merge_ops  # ONNX Runtime fuses some nodes (FusedMatMul), but the merge's ranks and gathers run as written
    for side in (merged, baseline):
        assert sum(op["ms"] for op in side["ops"].values()) <= side["total_ms"] * 1.05
    assert "| op type | merged ms |" in printed and "new" in printed
    assert main(["bench", str(tiny), "--profile", "--plot", str(tmp_path / "p.png")]) == 2


def test_cli_export_build_and_bench(hf_dirs, tmp_path, capsys):
    """The three commands chained as a user runs them, on a small Hugging Face ViT."""
    model, engine_out = tmp_path / "vit.onnx", tmp_path / "cli.engine"
    assert main(["export", "--model", f"hf:{hf_dirs['vit']}", "--method", "pitome", "--r", "0.9", "--seed", "0", "-o", str(model)]) == 0
    assert main(["build", str(model), "-o", str(engine_out), "--batch", "1:1:2", "--timing-cache", str(tmp_path / "t.cache")]) == 0
    assert engine_out.is_file() and sidecar_path(engine_out).is_file()
    report_file, plot_file = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", str(model), "--batch", "1", "--min-rounds", "3", "--seconds", "2",
                 "--json", str(report_file), "--plot", str(plot_file)]) == 0
    out = capsys.readouterr().out
    assert "| 1 |" in out and plot_file.is_file()
    report = json.loads(report_file.read_text())
    assert report["results"][0]["batch"] == 1 and report["method"] == "pitome"


def test_bench_exports_the_baseline_in_the_merged_models_dtype(hf_dirs, tmp_path):
    """An fp16 export is measured against an fp16 baseline, not an fp32 one."""
    from tokenfuse.exporter import export

    merged = tmp_path / "vit16.onnx"
    export(f"hf:{hf_dirs['vit']}", merged, method="tome", r=2, dtype="fp16", validate=False, log=lambda *_: None)
    baseline = bench_module.ensure_baseline(merged, None, tmp_path, log=lambda *_: None)
    manifest = json.loads(baseline.with_suffix(".json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["method"] == "none"


def test_a_provider_asked_for_first_is_never_swapped_for_another(tiny):
    """--providers CUDAExecutionProvider,CPUExecutionProvider on an onnxruntime without CUDA is an
    error, not a silent CPU run (a benchmark would report CPU figures as the GPU's)."""
    with pytest.raises(UsageError, match="CUDAExecutionProvider is not in this onnxruntime.*onnxruntime-gpu"):
        load(tiny, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_reports_name_the_gpu_only_when_a_gpu_ran_them():
    machine = {"cpu": "Xeon", "cores": 16, "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "memory": "81559 MiB"}}
    on_gpu = {"machine": machine, "backend": "onnxruntime", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert bench_module.where(on_gpu) == "NVIDIA H100 80GB HBM3 (driver 580.159.04), host Xeon (16 cores)"
    assert bench_module.where({**on_gpu, "providers": ["CPUExecutionProvider"]}) == "Xeon (16 cores)"
    assert bench_module.where({**on_gpu, "machine": {**machine, "gpu": None}}) == "Xeon (16 cores)"


@pytest.mark.parametrize("args", [["build", "missing.onnx", "-o", "x.engine"], ["bench", "missing.onnx"], ["build", "m.onnx", "-o", "x.engine", "--batch", "9:1:2"]])
def test_cli_engine_errors_are_one_line(args, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as exc:  # an argument error: argparse exits
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tokenfuse: error:")
    assert not (tmp_path / "x.engine").exists()
