"""The ``bhpeft`` command: the demo end to end on a few real reviews, and one-line errors."""

import json

from bhpeft_ppl.cli import main


def test_demo_writes_metrics_for_both_methods(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(
        [
            *("demo", "--out", str(out), "--train-size", "32", "--test-size", "24"),
            *("--epochs", "1", "--samples", "2", "--max-length", "32", "--quiet"),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for method in ("bh_peft", "map_hybrid"):
        scores = metrics["methods"][method]
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["ece"] <= 1.0
        assert scores["nll"] > 0 and 0.0 <= scores["brier"] <= 2.0
        assert (out / method / "posterior.safetensors").is_file()
    assert metrics["seed"] == 0 and "torch" in metrics["versions"]
    printed = capsys.readouterr().out
    assert "bh_peft" in printed and "map_hybrid" in printed


def test_unknown_model_folder_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["demo", "--out", str(tmp_path / "x"), "--model", str(tmp_path / "missing"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("bhpeft: error:") and "missing" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()
