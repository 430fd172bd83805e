"""The analysis scripts run end to end in their --smoke mode and write what they promise."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_performance_smoke(tmp_path):
    out = tmp_path / "bench"
    subprocess.run(
        [sys.executable, str(ROOT / "analyses" / "benchmark_performance.py"), "--smoke", "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    results = json.loads((out / "results.json").read_text())
    ratio = results["ratios"]["train_step_vs_map"]
    assert ratio > 0 and ratio == results["median_step_seconds"]["bh_peft"] / results["median_step_seconds"]["map"]
    assert len(results["step_seconds"]["bh_peft"]) == len(results["step_seconds"]["map"]) > 0
    assert results["sites"]["bh_peft"] == results["sites"]["map"] > 0
    ratios = results["ratios"]
    expected = {"train_step_vs_peft_lora", "predict_vs_single_passes", "predict_top_lora_vs_single_passes", "peak_memory_vs_map"}
    assert set(ratios) >= expected
    assert all(value > 0 for key, value in ratios.items() if key != "step_memory_vs_map")
    assert (
        ratios["train_step_vs_peft_lora"]
        == results["median_step_seconds"]["bh_peft"] / results["median_step_seconds"]["peft_lora"]
    )
    assert isinstance(results["pyro_overhead_ms_per_site"], float) and results["overhead_sites"] > 10
    assert all(m["peak_kib"] >= m["loaded_kib"] > 0 for m in results["memory_kib"].values())
    assert {"torch", "pyro-ppl", "transformers"} <= set(results["versions"])
    assert not list(out.glob("*.tmp"))


def test_dynamic_finetuning_smoke_writes_results_and_resumes(tmp_path):
    out = tmp_path / "dynamic"
    command = [sys.executable, str(ROOT / "analyses" / "dynamic_finetuning.py"), "--smoke", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    results = json.loads((out / "results.json").read_text())
    methods = {r["method"] for r in results["records"] if r["scenario"] == "sst2"}
    assert methods == {"bh_dynamic", "bh_dynamic_infl100", "map_continual", "map_retrain", "bh_retrain"}
    for record in results["records"]:
        if record["scenario"] == "sst2":
            assert {"accuracy", "ece", "nll", "seconds", "round"} <= set(record)
            assert 0 <= record["accuracy"] <= 1 and record["seconds"] >= 0
            assert ("forgetting_accuracy" in record) == (record["round"] > 0)
        else:
            assert {"accuracy_sst2", "accuracy_food", "domain"} <= set(record)
    assert results["config"]["seeds"] == [0] and "torch" in results["versions"]
    table = (out / "table.md").read_text()
    assert "| bh_dynamic |" in table and "### accuracy" in table
    assert (out / "sst2.png").is_file() and (out / "drift.png").is_file()
    # a rerun finds every cell done and changes nothing
    before = (out / "results.json").read_text()
    rerun = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    assert rerun.stdout.count("done, skipped") == len(results["cells"])
    assert json.loads((out / "results.json").read_text())["cells"] == json.loads(before)["cells"]
    # cells are seeded one by one: run in one process instead of two, every figure but the timings is the same
    assert results["runs"][0]["jobs"] == 2 and len(results["cell_seconds"]) == len(results["cells"])
    serial = tmp_path / "serial"
    subprocess.run([*command[:-1], str(serial), "--jobs", "1"], check=True, capture_output=True, timeout=900)

    def untimed(cells):
        return {key: [{k: v for k, v in r.items() if k != "seconds"} for r in records] for key, records in cells.items()}

    assert untimed(json.loads((serial / "results.json").read_text())["cells"]) == untimed(results["cells"])


def test_memory_estimate_counts_the_injected_sites(tmp_path):
    out = tmp_path / "memory"
    command = [sys.executable, str(ROOT / "analyses" / "memory_estimate.py"), "--model", "minilm-l6", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    rows = {r["guide"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    from transformers import AutoModel

    from bhpeft_ppl import HybridSpec, inject
    from bhpeft_ppl.backbone import bundled_path

    peft = inject(AutoModel.from_pretrained(bundled_path("minilm")), HybridSpec.bh_peft())
    assert rows["mean_field"]["sites"] == len(peft.sites)
    latent = sum(int(torch.Size(s.shape).numel()) for s in peft.sites.values())
    assert rows["mean_field"]["latent_weights"] == latent
    # mean-field keeps two variational parameters per weight, MAP one: twice the optimizer memory
    assert rows["mean_field"]["guide_params_grads_adam_gib"] == 2 * rows["map"]["guide_params_grads_adam_gib"]
    assert (out / "table.md").read_text().count("| minilm-l6 |") == 2


def test_compare_methods_smoke_writes_every_cell_and_resumes(tmp_path):
    out = tmp_path / "compare"
    command = [sys.executable, str(ROOT / "analyses" / "compare_methods.py"), "--smoke", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=900)
    results = json.loads((out / "results.json").read_text())
    tasks = ("sst2", "ag_news", "commonsense_qa")
    methods = (
        "map_lora",
        "map_adapter",
        "map_prefix",
        "map_hybrid",
        "peft_lora",
        "mc_dropout",
        "deep_ensemble",
        "temperature_scaling",
        "laplace_head",
        "blob_lora",
        "paper_released",
        "bhpeft_full",
    )
    cells = [(r["task"], r["method"], r["seed"]) for r in results["records"]]
    assert sorted(cells) == sorted((t, m, 0) for t in tasks for m in methods)  # one record per cell, no more
    assert results["seeds"] == [0] and "torch" in results["versions"] and results["config"]["smoke"]
    for record in results["records"]:
        for key in ("accuracy", "ece", "aurc", "accuracy_reject_10", "accuracy_reject_20", "accuracy_reject_50"):
            assert 0 <= record[key] <= 1, (record["task"], record["method"], key)
        assert record["nll"] >= 0 and 0 <= record["brier"] <= 2
        assert record["seconds"] > 0 and record["predict_seconds"] >= 0 and record["peak_rss_mb"] > 0
        assert ("ood_auroc" in record) == (record["task"] == "sst2")
        if "ood_auroc" in record:
            assert 0 <= record["ood_auroc"] <= 1
    draws = {(r["task"], r["method"]): r["draws"] for r in results["records"]}
    assert draws[("sst2", "map_hybrid")] == 1 and draws[("sst2", "bhpeft_full")] == 3 and draws[("sst2", "deep_ensemble")] == 3
    table = (out / "table.md").read_text()
    for method in methods:  # a row per task, and one more in the paired table for all but the reference
        assert table.count(f"| {method} |") == len(tasks) * (1 if method == "map_hybrid" else 2), method
    assert (out / "ece_vs_accuracy.png").is_file() and (out / "rejection.png").is_file()
    # each method against map_hybrid on the same seed: 11 rows per task
    assert table.count("Paired against `map_hybrid`") == len(tasks)
    by_cell = {(r["task"], r["method"]): r for r in results["records"]}
    delta = by_cell[("sst2", "bhpeft_full")]["nll"] - by_cell[("sst2", "map_hybrid")]["nll"]
    paired_rows = [line for line in table.splitlines() if line.startswith("| bhpeft_full |") and "/1)" in line]
    assert len(paired_rows) == len(tasks) and f"| {round(delta, 3) + 0.0:+.3f} (" in paired_rows[0]

    # a rerun finds every cell done and changes nothing
    before = (out / "results.json").read_text()
    rerun = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    assert rerun.stdout.count("done, skipped") == len(tasks) * len(methods)
    assert "running" not in rerun.stdout
    assert (out / "results.json").read_text() == before

    # a save by one run keeps the records another run on the folder saved meanwhile
    sys.path.insert(0, str(ROOT / "analyses"))
    import compare_methods

    other = next(r for r in results["records"] if (r["task"], r["method"]) == ("sst2", "map_lora"))
    mine = {**results, "records": [r for r in results["records"] if r is not other]}
    compare_methods.save(json.loads(json.dumps(mine)), out)
    merged = json.loads((out / "results.json").read_text())
    assert merged["records"] == results["records"] and (out / "results.json").read_text() == before
    # a cell two runs both computed is kept once
    compare_methods.save(json.loads(json.dumps({**results, "records": [*results["records"], other]})), out)
    assert (out / "results.json").read_text() == before

    # a deleted record is recomputed, and only that one
    kept = [r for r in results["records"] if (r["task"], r["method"]) != ("ag_news", "laplace_head")]
    (out / "results.json").write_text(json.dumps({**results, "records": kept}))
    rerun = subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    assert rerun.stdout.count("done, skipped") == len(tasks) * len(methods) - 1
    assert rerun.stdout.count(": running") == 1 and "ag_news/laplace_head/0: running" in rerun.stdout
    again = json.loads((out / "results.json").read_text())
    assert len(again["records"]) == len(results["records"])
    redone = next(r for r in again["records"] if (r["task"], r["method"]) == ("ag_news", "laplace_head"))
    old = next(r for r in results["records"] if (r["task"], r["method"]) == ("ag_news", "laplace_head"))
    assert redone["accuracy"] == old["accuracy"] and redone["nll"] == old["nll"]  # same seeds, same fit: same numbers

    # the ablations go to the same results, in a table of their own
    ablations = subprocess.run([*command, "--ablations"], check=True, capture_output=True, text=True, timeout=900)
    assert ablations.stdout.count(": running") == 12
    records = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"] if r["task"] == "sst2"}
    ablated = ("bayes_lora", "bayes_adapter", "bayes_prefix", "bayes_head", "prior_x0.1", "prior_x10")
    assert set(ablated) | {"kl_weight_0.1", "kl_weight_0.01", "bhpeft_draws"} <= set(records)
    assert records["kl_weight_0.1"]["kl_weight"] == 0.1 and records["prior_x10"]["prior_scale_factor"] == 10
    assert all("commit" in r for r in records.values())  # the code each cell ran (None outside a checkout)
    other_lr = records["kl_weight_0.01_lr_0.002"]
    assert other_lr["lr"] == 0.002 and other_lr["kl_weight"] == 0.01 and "lr" not in records["kl_weight_0.01"]
    assert other_lr["accuracy"] != records["kl_weight_0.01"]["accuracy"] or other_lr["nll"] != records["kl_weight_0.01"]["nll"]
    assert records["prior_x10_lr_0.002"]["prior_scale_factor"] == 10
    map_wide = records["map_prior_x10_lr_0.002"]
    assert map_wide["prior_scale_factor"] == 10 and map_wide["lr"] == 0.002 and map_wide["draws"] == 1
    draws = records["bhpeft_draws"]
    assert draws["draws"] == 30 and {"draws_1", "draws_3", "draws_5", "draws_10", "draws_30"} <= set(draws)
    # the first 3 of its 30 draws from the cached bhpeft_full fit are bhpeft_full's 3 draws
    for key in ("accuracy", "ece", "nll", "ood_auroc"):
        assert draws["draws_3"][key] == pytest.approx(records["bhpeft_full"][key], abs=1e-6), key
        assert draws["draws_30"][key] == pytest.approx(draws[key], abs=1e-6), key
    assert draws["seconds"] == records["bhpeft_full"]["seconds"]  # the same fit, not refitted
    table = (out / "table.md").read_text()
    assert "### sst2 ablations" in table and "| LoRA only |" in table and "| KL weight 0.01 |" in table
    assert "| 30 |" in table and table.count("| everything (bhpeft_full) |") == 1


def test_collapse_diagnosis_smoke_writes_every_setting_and_resumes(tmp_path):
    out = tmp_path / "collapse"
    command = [sys.executable, str(ROOT / "analyses" / "collapse_diagnosis.py"), "--smoke", "--out", str(out)]
    first = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    settings = results["settings"]
    assert set(settings) == {"kl_weight_1_lr_0.01", "kl_weight_0.01_lr_0.01", "kl_weight_0.01_lr_0.002"}
    for name, record in settings.items():
        assert record["lr"] in (0.01, 0.002) and record["kl_weight"] in (1.0, 0.01), name
        assert len(record["log_likelihood_by_tenth"]) >= 2 and all(v < 0 for v in record["log_likelihood_by_tenth"])
        assert {"lora_A", "lora_B", "adapter_up", "prefix_gate", "head"} <= set(record["mean_abs_loc"])
        assert 0.0 <= record["accuracy_at_mean"] <= 1.0
        assert set(record["accuracy_without"]) == {"lora_B", "adapter_up", "prefix_gate"}
    # the KL weight and the learning rate reach the fit: the weights end at different sizes
    sizes = [settings[n]["mean_abs_loc"]["lora_B"] for n in settings]
    assert len(set(sizes)) == 3
    assert "torch" in results["versions"] and first.stdout.count("accuracy at the mean") == 3
    assert "| kl_weight_0.01_lr_0.002 |" in (out / "table.md").read_text()
    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    assert again.stdout.count("done, skipped") == 3
    assert json.loads((out / "results.json").read_text())["settings"] == settings


def test_compare_methods_tuned_chooses_on_validation(tmp_path):
    out = tmp_path / "compare"
    command = [sys.executable, str(ROOT / "analyses" / "compare_methods.py"), "--smoke", "--out", str(out), "--tasks", "sst2"]
    subprocess.run([*command, "--methods", "map_hybrid", "bhpeft_full"], check=True, capture_output=True, timeout=900)
    tuned = subprocess.run([*command, "--tuned"], check=True, capture_output=True, text=True, timeout=900)
    assert tuned.stdout.count(": running") == 2
    records = {r["method"]: r for r in json.loads((out / "results.json").read_text())["records"]}
    assert set(records) == {"map_hybrid", "bhpeft_full", "map_hybrid_tuned", "bhpeft_full_tuned"}
    for method, draws in (("map_hybrid", 1), ("bhpeft_full", 3)):
        record, grid = records[f"{method}_tuned"], records[f"{method}_tuned"]["grid"]
        settings = [(point["prior_scale_factor"], point["lr"]) for point in grid]
        assert sorted(settings) == sorted((f, r) for f in (1.0, 3.0, 10.0) for r in (0.002, 0.005, 0.01))
        best = min(grid, key=lambda point: point["validation_nll"])
        assert (record["prior_scale_factor"], record["lr"]) == (best["prior_scale_factor"], best["lr"])
        assert all(point["validation_nll"] >= best["validation_nll"] for point in grid)
        assert record["seconds"] == pytest.approx(sum(point["seconds"] for point in grid))
        assert record["chosen_seconds"] == best["seconds"] and record["draws"] == draws
        assert record["validation_size"] == 16 and 0 <= record["accuracy"] <= 1 and "ood_auroc" in record
        # the grid point at the main run's setting is the main run's fit, not a refit
        main = next(point for point in grid if (point["prior_scale_factor"], point["lr"]) == (1.0, 0.01))
        assert main["seconds"] == records[method]["seconds"]
        # the nine fits differ: the grid is not one fit scored nine times
        assert len({point["validation_nll"] for point in grid}) > 1
    table = (out / "table.md").read_text()
    assert "### sst2: prior scale and learning rate chosen on validation" in table
    assert table.count("| bhpeft_full_tuned |") == 1 and table.count("| map_hybrid_tuned |") == 1
    assert table.count("| 0 |") >= 4  # each tuned method and its fixed-setting twin, on seed 0
    rerun = subprocess.run([*command, "--tuned"], check=True, capture_output=True, text=True, timeout=900)
    assert rerun.stdout.count("done, skipped") == 2 and "running" not in rerun.stdout
