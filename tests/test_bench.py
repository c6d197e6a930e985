"""The benchmark suite's behaviour (never its speed): the harness returns finite positive
metrics, the reference carries our weights and computes our outputs, benchmark grids
measure each point once (cache), skip invalid points and log to MLflow, and `nanovlm bench`
runs compare, gpu-check and grid."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from nanovlm.bench.harness import (
    InferenceSpec, NanoVLMRunner, Stat, TrainSpec, benchmark, interleave, matmul_peak_flops, synthetic_batch,
)
from nanovlm.bench.reference import ReferenceRunner, build_reference
from nanovlm.cli import main
from nanovlm.bench.grid import grid_points, load_grid, parse_grid, run_grid
from nanovlm.config import ConfigError, preset
from nanovlm.models import VisionLanguageModel

REPO = Path(__file__).resolve().parents[1]


def _tiny(**overrides):
    return preset("tiny", lm_n_blocks=2, vit_n_blocks=2, **overrides)[0].validate()


def test_harness_returns_every_metric_finite_and_positive():
    # 16 new tokens and 3 repetitions: with 3 tokens and 2 repetitions a noisy machine once made
    # both long generate calls no slower than the short ones (decode rate NaN by design).
    result = benchmark(_tiny(), infer=InferenceSpec(batch_size=2, prompt_tokens=8, new_tokens=16),
                       train=TrainSpec(batch_size=2, text_tokens=8), warmup=1, repeats=3, peak_flops=1e10)
    expected_infer = {"vision_encode_s", "images_per_s", "time_to_first_token_s", "prefill_tokens_per_s",
                      "decode_tokens_per_s", "end_to_end_s", "peak_memory_mb"}
    expected_train = {"step_time_s", "tokens_per_s", "samples_per_s", "flops_per_s", "mfu", "peak_memory_mb"}
    assert set(result.inference) == expected_infer
    assert set(result.training) == expected_train
    metrics = result.metrics()
    assert metrics and all(math.isfinite(v) and v > 0 for v in metrics.values()), metrics


def test_synthetic_batch_supervises_every_text_token_or_only_the_answer():
    cfg = preset("tiny")[0]
    n_img = cfg.mp_image_token_length
    every = synthetic_batch(cfg, 2, 10)
    assert (every.targets != -100).sum(dim=1).tolist() == [9, 9]
    assert torch.equal(every.targets[:, n_img:-1], every.input_ids[:, n_img + 1:])
    answer = synthetic_batch(cfg, 2, 10, answer_tokens=3)
    assert (answer.targets != -100).sum(dim=1).tolist() == [3, 3]
    assert torch.equal(answer.targets[:, -4:-1], answer.input_ids[:, -3:])
    with pytest.raises(ValueError, match="answer_tokens"):
        synthetic_batch(cfg, 2, 10, answer_tokens=10)


def test_matmul_peak_is_positive_flops():
    assert matmul_peak_flops("cpu", "float32", size=128, repeats=2) > 0


def test_stat_reports_median_and_quartiles():
    s = Stat.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.p25, s.p75, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)


def test_interleave_alternates_order_between_rounds():
    calls = []
    trials = {name: (lambda name=name: calls.append(name) or {"x": 1.0}) for name in ("a", "b")}
    interleave(trials, warmup=0, repeats=4)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_reference_carries_our_weights_and_computes_our_outputs():
    cfg = _tiny()
    torch.manual_seed(0)
    ours = VisionLanguageModel(cfg)
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    o, r = NanoVLMRunner(ours), ReferenceRunner(build_reference(ours))
    batch = synthetic_batch(cfg, batch_size=2, text_tokens=10)
    assert (o.logits(batch) - r.logits(batch)).abs().max().item() <= 1e-4
    one = synthetic_batch(cfg, batch_size=1, text_tokens=10, seed=3)
    assert torch.equal(o.generate(one, 12), r.generate(one, 12))
    _, our_loss = ours(batch.input_ids, images=batch.images, targets=batch.targets)
    assert r.loss(batch).item() == pytest.approx(our_loss.item(), abs=1e-5)


# ---------------------------------------------------------------- grids

GRID = {
    "name": "t",
    "preset": "tiny",
    "overrides": {"vit_img_size": 64},  # 8x8 patch grid: shuffle factors 1, 2, 4 are valid, 3 is not
    "grid": {"mp_pixel_shuffle_factor": [2, 4]},
    "measure": {"inference": {"batch_size": 1, "prompt_tokens": 4, "new_tokens": 2}, "training": None,
                "warmup": 0, "repeats": 1},
    "plots": [{"x": "mp_pixel_shuffle_factor", "y": "infer_decode_tokens_per_s"}],
}


class CountingMeasure:
    """Stands in for the timed measurement: records which points it was asked to measure."""

    def __init__(self):
        self.keys: list[str] = []

    def __call__(self, grid, points, out):
        self.keys += [p.key for p in points]
        return {p.key: {"infer_decode_tokens_per_s": 100.0 * (i + 1)} for i, p in enumerate(points)}


def test_every_shipped_grid_file_parses_into_points():
    files = sorted((REPO / "benchmarks" / "grids").glob("*.yaml"))
    assert {f.name for f in files} >= {"batch.yaml", "compile.yaml", "gpu.yaml", "shuffle.yaml"}
    for path in files:
        assert len(grid_points(load_grid(path))) >= 2, path


def test_tune_holds_sweep_spaces_and_no_benchmark_grid():
    for path in sorted((REPO / "tune").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        assert "space" in data and "grid" not in data, f"{path} looks like a benchmark grid"


def test_cached_points_are_not_measured_again(tmp_path):
    measure = CountingMeasure()
    first = run_grid(parse_grid(GRID), tmp_path, tracking=False, measure_fn=measure)
    assert len(measure.keys) == 2 and len(first.measured) == 2

    measure.keys.clear()
    second = run_grid(parse_grid(GRID), tmp_path, tracking=False, measure_fn=measure)
    assert measure.keys == [] and second.measured == []
    assert [r["status"] for r in second.rows] == ["ok", "ok"]
    assert [r["infer_decode_tokens_per_s"] for r in second.rows] == [r["infer_decode_tokens_per_s"] for r in first.rows]

    bigger = {**GRID, "grid": {"mp_pixel_shuffle_factor": [1, 2, 4]}}
    third = run_grid(parse_grid(bigger), tmp_path, tracking=False, measure_fn=measure)
    assert len(measure.keys) == 1 and [r["mp_pixel_shuffle_factor"] for r in third.rows] == ["1", "2", "4"]


def test_a_changed_setting_is_a_new_point(tmp_path):
    measure = CountingMeasure()
    run_grid(parse_grid(GRID), tmp_path, tracking=False, measure_fn=measure)
    longer = {**GRID, "measure": {**GRID["measure"], "inference": {**GRID["measure"]["inference"], "new_tokens": 8}}}
    run_grid(parse_grid(longer), tmp_path, tracking=False, measure_fn=measure)
    assert len(measure.keys) == 4


def test_grid_writes_tables_and_plots(tmp_path):
    run = run_grid(parse_grid(GRID), tmp_path, tracking=False, measure_fn=CountingMeasure())
    assert (run.output_dir / "results.csv").read_text().startswith("mp_pixel_shuffle_factor,status")
    assert "| mp_pixel_shuffle_factor | status |" in (run.output_dir / "results.md").read_text()
    assert (run.output_dir / "infer_decode_tokens_per_s_vs_mp_pixel_shuffle_factor.png").stat().st_size > 0


def test_unknown_field_in_a_grid_fails_before_measuring():
    with pytest.raises(ConfigError, match="mp_pixel_shufle_factor.*did you mean 'mp_pixel_shuffle_factor'"):
        parse_grid({**GRID, "grid": {"mp_pixel_shufle_factor": [2]}})


def test_invalid_point_is_reported_and_not_measured(tmp_path):
    measure = CountingMeasure()
    run = run_grid(parse_grid({**GRID, "grid": {"mp_pixel_shuffle_factor": [2, 3]}}), tmp_path,
                   tracking=False, measure_fn=measure)
    assert [r["status"] for r in run.rows] == ["ok", "invalid"]
    assert "mp_pixel_shuffle_factor" in run.rows[1]["error"] and len(measure.keys) == 1


def test_named_axis_applies_its_group_of_overrides():
    grid = parse_grid({**GRID, "plots": [],
                       "grid": {"lm": {"a": {"lm_n_blocks": 1}, "b": {"lm_n_blocks": 2, "lm_hidden_dim": 64}}}})
    points = grid_points(grid)
    assert [p.config["vlm"]["lm_n_blocks"] for p in points] == [1, 2]
    assert points[1].config["vlm"]["lm_hidden_dim"] == 64 and points[0].key != points[1].key


def _write_grid(path, **changes):
    path.write_text(yaml.safe_dump({**GRID, **changes}, sort_keys=False))
    return str(path)


def test_bench_grid_command_measures_locally_then_serves_the_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NANOVLM_HOME", str(tmp_path / "home"))
    # 8 new tokens: with 2, one decode step is within timing noise on a loaded machine
    grid = _write_grid(tmp_path / "t.yaml", measure={**GRID["measure"], "inference": {
        **GRID["measure"]["inference"], "new_tokens": 8}})
    command = ["bench", "grid", grid, "--set", "lm_n_blocks=1", "--set", "vit_n_blocks=1", "--executor", "local",
               "--output", str(tmp_path / "out"), "--no-tracking"]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "| mp_pixel_shuffle_factor | status |" in printed
    assert "2 point(s) measured, 0 from the cache" in printed and "MLflow run" not in printed
    assert main(command) == 0
    assert "0 point(s) measured, 2 from the cache" in capsys.readouterr().out
    assert not (tmp_path / "home" / "mlflow.db").exists()


@pytest.mark.slow
def test_bench_grid_command_on_ray_tune_logs_each_point_to_mlflow(tmp_path, monkeypatch, capsys):
    from nanovlm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # 8 new tokens: with 2, one decode step is within timing noise on a loaded machine and the
    # harness reports decode speed as NaN (long call no slower than the short one)
    measure = {**GRID["measure"], "inference": {**GRID["measure"]["inference"], "new_tokens": 8}}
    grid = _write_grid(tmp_path / "t.yaml", overrides={**GRID["overrides"], "lm_n_blocks": 1, "vit_n_blocks": 1},
                       measure=measure, resources={"cpu": 1})
    assert main(["bench", "grid", grid, "--output", str(tmp_path / "out")]) == 0
    assert "2 point(s) measured, 0 from the cache" in capsys.readouterr().out
    with (tmp_path / "out" / "results.csv").open() as f:
        rows = list(__import__("csv").DictReader(f))
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(float(r["infer_decode_tokens_per_s"]) > 0 for r in rows)
    runs = list(tracking.iter_runs("bench-t", uri))
    children = [r for r in runs if tracking.PARENT_RUN_TAG in r.data.tags]
    assert len(children) == 2 and len({c.data.tags[tracking.PARENT_RUN_TAG] for c in children}) == 1
    assert {c.data.params["mp_pixel_shuffle_factor"] for c in children} == {"2", "4"}
    assert all(c.data.metrics["infer_decode_tokens_per_s"] > 0 for c in children)


# ---------------------------------------------------------------- the command

def test_bench_help_lists_compare_gpu_check_and_grid(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("compare", "gpu-check", "grid"))


@pytest.mark.parametrize("benchmark, flag", [("compare", "--keep-freed-memory"), ("gpu-check", "--skip-reference"),
                                             ("grid", "--no-tracking")])
def test_each_benchmark_has_its_help(benchmark, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", benchmark, "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: nanovlm bench {benchmark} ") and flag in printed


def test_compare_flags_default_to_compare_settings_and_its_configs():
    from nanovlm.bench import compare
    from nanovlm.cli import build_parser

    args = build_parser().parse_args(["bench", "compare"])
    settings = compare.CompareSettings()
    assert (args.warmup, args.repeats, args.compile) == (settings.warmup, settings.repeats, settings.compile)
    assert args.configs == list(compare.CONFIGS)


def test_compare_rejects_an_unknown_config_before_measuring(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "compare", "--configs", "tiny,big"])
    assert exit_.value.code == 2
    assert "unknown configs ['big']; choose from ['mid', 'tiny']" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["bench", "benchmarks/grids/shuffle.yaml"],
                                     ["bench", "grid", "benchmarks/grids/shuffle.yaml", "--no-mlflow"]])
def test_the_old_grid_spellings_are_usage_errors(command):
    with pytest.raises(SystemExit) as exit_:
        main(command)
    assert exit_.value.code == 2


def test_gpu_check_rehearses_on_cpu_and_reports_every_measurement(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    code = main(["bench", "gpu-check", "--preset", "tiny", "--device", "cpu", "--quick", "--skip-compile",
                 "--json", str(out)])
    report = __import__("json").loads(out.read_text())
    assert code == 0 and report["errors"] == {}
    assert set(report["results"]) == {"matmul_peak", "train_float32_eager", "decode_bs1", "decode_bs32",
                                      "versus_reference"}
    assert report["results"]["train_float32_eager"]["mfu"] > 0
    assert "| decode_bs1 | decode_tokens_per_s |" in capsys.readouterr().out


def test_compare_writes_every_measure_with_ratio_and_the_bounds(tmp_path, capsys):
    import json

    from nanovlm.bench import compare

    out = tmp_path / "compare.json"
    code = main(["bench", "compare", "--configs", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1",
                 "--no-compile", "--json", str(out)])
    assert "threads: 1 of " in capsys.readouterr().out
    result = json.loads(out.read_text())["configs"]["tiny"]
    # Without compiled rows, "best" is ours eager, and the exit status says whether it reaches every target.
    assert {key: b["mode"] for key, b in result["best"].items()} == dict.fromkeys(result["measures"], "eager")
    assert code == (0 if all(m["ratio"] >= m["target"] for m in result["measures"].values()) else 1)
    assert result["check"]["greedy_tokens_identical"] and result["check"]["logits_max_abs_diff"] <= 1e-4
    assert set(result["measures"]) == {"train_tokens_per_s", "train_sft_tokens_per_s", "prefill_tokens_per_s",
                                       "decode_tokens_per_s"}
    for measure in result["measures"].values():
        assert measure["ours"] > 0 and measure["reference"] > 0
        assert math.isclose(measure["ratio"], measure["ours"] / measure["reference"], rel_tol=1e-6)
        assert measure["verdict"] == compare.verdict(measure["ratio"], measure["ratio_p25"], measure["ratio_p75"],
                                                     measure["target"])
    assert result["decode_memory_bound"]["tokens_per_s"] > 0
    bounds = result["train_compute_bound"]
    assert set(bounds) == {"train_tokens_per_s", "train_sft_tokens_per_s"}
    for bound in bounds.values():
        # Ours skips the LM head on unsupervised positions: fewer FLOPs than the reference's step.
        assert 0 < bound["ours_gflop_per_step"] < bound["reference_gflop_per_step"]
        assert math.isclose(bound["ceiling_ratio"], bound["reference_step_s"] / bound["ours_floor_step_s"])
        assert 0 < bound["ours_warm_gemm_step_s"] < math.inf
        assert math.isclose(bound["warm_gemm_ceiling_ratio"], bound["reference_step_s"] / bound["ours_warm_gemm_step_s"])
    assert bounds["train_sft_tokens_per_s"]["ours_gflop_per_step"] < bounds["train_tokens_per_s"]["ours_gflop_per_step"]


def test_compare_best_of_ours_takes_the_faster_mode_per_measure():
    from nanovlm.bench.compare import best_of_ours

    def m(ratio, target):
        return {"ratio": ratio, "ratio_p25": ratio - 0.05, "ratio_p75": ratio + 0.05, "target": target,
                "verdict": "v"}

    best = best_of_ours({"train_tokens_per_s": m(1.1, 1.2), "train_tokens_per_s_compiled": m(1.3, 1.2),
                         "prefill_tokens_per_s": m(1.1, 1.0),
                         "decode_tokens_per_s": m(1.6, 2.0), "decode_tokens_per_s_compiled": m(1.5, 2.0)})
    assert set(best) == {"train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"}
    assert (best["train_tokens_per_s"]["mode"], best["train_tokens_per_s"]["ratio"], best["train_tokens_per_s"]["met"]) \
        == ("compiled", 1.3, True)
    assert (best["prefill_tokens_per_s"]["mode"], best["prefill_tokens_per_s"]["met"]) == ("eager", True)
    assert (best["decode_tokens_per_s"]["mode"], best["decode_tokens_per_s"]["ratio"], best["decode_tokens_per_s"]["met"]) \
        == ("eager", 1.6, False)


def test_compare_verdict_calls_a_target_inside_the_ratio_spread_borderline():
    from nanovlm.bench.compare import verdict

    assert verdict(1.30, 1.25, 1.35, target=1.2) == "met"
    assert verdict(1.10, 1.05, 1.15, target=1.2) == "not met"
    assert verdict(1.21, 1.18, 1.29, target=1.2) == "borderline (met at the median)"
    assert verdict(1.19, 1.17, 1.22, target=1.2) == "borderline (not met at the median)"
    assert verdict(1.20, 1.20, 1.24, target=1.2) == "met"


def test_warm_gemm_seconds_times_every_matrix_product_of_the_step(monkeypatch):
    # One step of a runner whose "training" is two known GEMMs: both are recorded (with their
    # layouts) and timed; the total is the sum of the per-call times.
    from nanovlm.bench import compare

    a, w = torch.randn(64, 32), torch.randn(48, 32)

    class TwoGemms:
        def train_step(self, batch):
            (a @ w.t()).sum()
            torch.addmm(torch.zeros(48), a, w.t())

    seen = []
    monkeypatch.setattr(compare, "timed", lambda fn, device: seen.append(fn) or 0.25)
    assert compare.warm_gemm_seconds(TwoGemms(), batch=None, repeats=3) == 0.5
    assert len(seen) == 6   # 3 timed runs of each GEMM


def test_compare_keep_freed_memory_applies_to_the_process_and_is_recorded(monkeypatch):
    from nanovlm.bench import compare
    from nanovlm.training import loop

    for name in loop.malloc_environment():
        monkeypatch.delenv(name)
    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    assert compare.allocator_setting(False) == "glibc defaults" and not calls
    assert compare.allocator_setting(True).startswith("glibc keeps freed memory") and calls == [1]
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1073741824")
    assert compare.allocator_setting(True) == "set by the environment: MALLOC_TRIM_THRESHOLD_=1073741824"
    assert calls == [1]
