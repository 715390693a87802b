"""scripts/frontier.py: its configuration list and its arguments (the runs themselves are the
evaluation grid's, tested in test_eval_*)."""

import importlib.util
from pathlib import Path

import pytest

from sparkkv.eval import grid

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "frontier.py"


@pytest.fixture(scope="module")
def frontier():
    spec = importlib.util.spec_from_file_location("frontier_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_list_is_dense_first_and_every_label_is_unique(frontier):
    configs = frontier.frontier_configs()
    labels = [grid.label(c) for c in configs]
    assert configs[0] is None and len(set(labels)) == len(labels)
    for needed in ("quanto-int4", "quanto-int2", "hqq-int4", "hqq-int2", "none kq4 vq4", "none kq2 vq2",
                   "spark k0.8", "spark k0.8 kq4 vq4 trits", "spark k0.8 kq4 vq2 trits", "spark k0.8 kq8 vq8 trits"):
        assert needed in labels


def test_only_splits_labels_with_spaces(frontier):
    rest, only = frontier._split_only(["--n", "3", "--only", "dense", "spark k0.8 kq4 vq4 trits", "--out", "X"])
    assert rest == ["--n", "3", "--out", "X"] and only == ["dense", "spark k0.8 kq4 vq4 trits"]
    assert frontier._split_only(["--n", "3"]) == (["--n", "3"], None)


@pytest.mark.parametrize("only", [["spark k0.9"], []])
def test_an_unknown_or_empty_only_is_one_line_exit_2(frontier, only, tmp_path, capsys):
    argv = ["--model", "testbed", "--tasks", "passkey", "--n", "1", "--out", str(tmp_path / "out"), "--only", *only]
    assert frontier.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only" in err[0] and "quanto-int4" in err[0]
    assert not (tmp_path / "out").exists()
