"""The command line on the embedded default checkpoint (assets/tiny-llava)."""
from __future__ import annotations

import json

import pytest

from tokenprune.cli import DEFAULT_MODEL, main


def test_run_on_embedded_default(capsys):
    assert DEFAULT_MODEL.exists()
    assert main(["run", "--strategy", "fopru", "--budget", "16", "--param", "mode=row", "--compact"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["visual_tokens_kept"] == [16] and report["params"]["mode"] == "row"
    assert len(report["kept_indices"][0][0]) == 16


def test_run_without_pruning_and_bad_params(capsys):
    assert main(["run", "--strategy", "none", "--compact"]) == 0
    assert "visual_tokens_kept" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with pytest.raises(SystemExit, match="unknown parameter"):
        main(["run", "--param", "bogus=1"])
    with pytest.raises(SystemExit, match="keep must be"):
        main(["run", "--keep", "2"])


def test_list(capsys):
    main(["list"])
    out = capsys.readouterr().out
    assert "hiprune" in out and "llava" in out


def test_bench_smoke(tmp_path, capsys):
    main(["bench", "--repeats", "1", "--strategies", "random", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "microbench_cpu.json").read_text())
    assert res["rows"][0]["kept"] == 144 and res["rows"][0]["prefill_unpruned_ms"] > 0
