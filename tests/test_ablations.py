"""The paper's ablations from the command line (Tables 5 and 6): what `diffpriv protect
--no-guidance` and `--one-embedding` change in a workflow, and what a graph says it ran."""
from __future__ import annotations

import argparse
import copy

import pytest

from diffpriv_client import cli, graphs

PROTECT_WORKFLOWS = ("anonymize", "hide", "anonymize_faces", "hide_faces", "anonymize_faces_target",
                     "hide_faces_target", "anonymize_samplercustom")


@pytest.mark.parametrize("name", PROTECT_WORKFLOWS)
def test_each_shipped_workflow_switches_to_either_ablation_and_says_so(name):
    shipped = graphs.load_workflow(graphs.default_workflow(name))
    assert graphs.ablations(shipped) == []  # the method itself
    unguided, one = copy.deepcopy(shipped), copy.deepcopy(shipped)
    graphs.set_no_guidance(unguided)
    graphs.set_one_embedding(one)
    assert graphs.ablations(unguided) == ["no-guidance"] and graphs.ablations(one) == ["one-embedding"]
    assert all(n["inputs"]["lambda_scale"] == 0 for n in graphs.nodes_of(unguided, "DiffPrivacyIdentityGuidance"))
    assert all(n["inputs"]["one_embedding"] is True for n in graphs.nodes_of(one, "DiffPrivacyMSIInversion"))
    graphs.set_one_embedding(unguided)
    assert graphs.ablations(unguided) == ["no-guidance", "one-embedding"]


def test_a_graph_without_a_guidance_that_acts_runs_without_guidance():
    graph = graphs.load_workflow(graphs.default_workflow("anonymize"))
    (sampler,) = graphs.nodes_of(graph, "DiffPrivacyGuidedDDIMSampler")
    (guidance,) = graphs.nodes_of(graph, "DiffPrivacyIdentityGuidance")
    guidance["inputs"].update(lambda_early=0.0, lambda_late=0.0)
    assert graphs.ablations(graph) == ["no-guidance"]
    guidance["inputs"]["lambda_late"] = 0.5
    assert graphs.ablations(graph) == []
    del sampler["inputs"]["guidance"]  # the guidance input is optional: no guidance at all
    assert graphs.ablations(graph) == ["no-guidance"]
    assert graphs.ablations(graphs.load_workflow(graphs.default_workflow("recover"))) == []  # no sampler


def test_a_switch_that_cannot_apply_is_refused_rather_than_ignored():
    graph = graphs.load_workflow(graphs.default_workflow("anonymize"))
    (guidance,) = graphs.nodes_of(graph, "DiffPrivacyIdentityGuidance")
    guidance["inputs"]["lambda_scale"] = ["somewhere", 0]
    with pytest.raises(ValueError, match="takes 'lambda_scale' from another node"):
        graphs.set_no_guidance(graph)
    recover = graphs.load_workflow(graphs.default_workflow("recover"))
    with pytest.raises(ValueError, match="--no-guidance needs a Guided DDIM Sampler"):
        graphs.set_no_guidance(recover)
    with pytest.raises(ValueError, match="--one-embedding needs a DiffPrivacyMSIInversion node"):
        graphs.set_one_embedding(recover)


def test_the_command_applies_the_switches_and_refuses_no_guidance_with_a_target(capsys):
    args = argparse.Namespace(command="protect", workflow=None, whole_image=True, task="hide", photo=None,
                              target_similarity=False, margin=None, no_guidance=True, one_embedding=True,
                              demo_weights=False, min_face_size=None, min_face_score=None, detector=None)
    assert graphs.ablations(cli.load_template(args)) == ["no-guidance", "one-embedding"]
    assert "running the paper's ablation w/o energy guidance (Table 5)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:
        cli.main(["protect", "x.png", "--task", "anonymize", "--no-guidance", "--target-similarity", "--out", "o"])
    assert refused.value.code == 2 and "choose one" in capsys.readouterr().err
