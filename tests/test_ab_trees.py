"""examples/ab_trees.py on the CPU: argument checks, and the aggregation of per-tree runs
(the timing itself runs on a GPU; here each tree's process is replaced by canned results)."""

import json
import sys

import pytest


@pytest.fixture
def ab(load_example):
    return load_example("ab_trees")


def _tree(tmp_path, name):
    t = tmp_path / name
    (t / "cuflash").mkdir(parents=True)
    (t / "kernels_cu").mkdir()
    return t


def test_rejects_a_folder_that_is_not_a_tree(ab, tmp_path, monkeypatch):
    good = _tree(tmp_path, "a")
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(sys, "argv", ["ab_trees.py", str(good), str(tmp_path / "b")])
    with pytest.raises(SystemExit):
        ab.main()


def test_means_changes_and_rotation(ab, tmp_path, monkeypatch, capsys):
    a, b = _tree(tmp_path, "old"), _tree(tmp_path, "new")
    calls = []
    # Tree "new" is 10 % faster in the forward; its deterministic backward costs 25 % over
    # its default one (time ratio = TFLOP/s ratio inverted: 100 / 80).
    figures = {"old": [[100.0, 200.0, 200.0], [102.0, 200.0, 200.0]],
               "new": [[110.0, 200.0, 160.0], [112.2, 200.0, 160.0]]}

    def fake_run(tree, argv):
        calls.append((tree.name, "--warm" in argv))
        if "--warm" in argv:
            return ""
        n = sum(1 for t, w in calls if t == tree.name and not w) - 1
        return "noise\nAB_RESULT " + json.dumps({"64|0|0.1|1024": figures[tree.name][n]}) + "\n"

    monkeypatch.setattr(ab, "run_tree", fake_run)
    out_json = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["ab_trees.py", str(a), str(b), "--runs", "2", "--dims", "64",
                                      "--seqlens", "1024", "--ps", "0.1", "--json", str(out_json)])
    ab.main()
    timed = [t for t, w in calls if not w]
    assert sorted(t for t, w in calls if w) == ["new", "old"]  # every tree compiled first
    assert timed == ["old", "new", "new", "old"]  # the order rotates from run to run
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("64|0|0.1|1024") and "(" in line)
    assert "101.0" in row and "111.1 (+10.0%)" in row
    cost = [line for line in text.splitlines() if line.startswith("64|0|0.1|1024")][-1]
    assert cost.split()[1:] == ["+0.0%", "+25.0%"]
    saved = json.loads(out_json.read_text())
    assert [len(r) for r in saved["runs"]] == [2, 2]


def test_forward_only_passes_the_flag_and_prints_the_forward_alone(ab, tmp_path, monkeypatch, capsys):
    a, b = _tree(tmp_path, "old"), _tree(tmp_path, "new")
    seen = []

    def fake_run(tree, argv):
        seen.append("--forward-only" in argv)
        if "--warm" in argv:
            return ""
        return "AB_RESULT " + json.dumps({"64|1|0.1|4096": [200.0 if tree.name == "old" else 210.0]}) + "\n"

    monkeypatch.setattr(ab, "run_tree", fake_run)
    monkeypatch.setattr(sys, "argv", ["ab_trees.py", str(a), str(b), "--runs", "1", "--dims", "64",
                                      "--seqlens", "4096", "--ps", "0.1", "--forward-only"])
    ab.main()
    assert seen and all(seen)  # the workers (warm-up and timing) get the flag too
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("hd|causal|p|S") and "fwd old" in line and "bwd" not in line for line in lines)
    row = next(line for line in lines if line.startswith("64|1|0.1|4096"))
    assert row.split()[1:] == ["200.0", "210.0", "(+5.0%)"]
    assert not any("deterministic" in line for line in lines)
