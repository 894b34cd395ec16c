"""Several photos in one prompt, without a server: the joined graph, each photo's part of the
result, the grouping of jobs, and the core's bookkeeping of whose face is where."""
from __future__ import annotations

import pytest

from diffpriv_client import graphs, photo_batches
from diffpriv_client.batch import Job, in_prompts
from diffpriv_client.cli import Connection, build_parser, main, photos_per_prompt
from diffpriv_client.comfy_http import PromptResult
from diffpriv_core.faces.crop import FaceCrop
from diffpriv_core.faces.photo_batch import join_crops, noise_indices, photo_rows, rows_of


def photo_graphs(task: str = "anonymize_faces", photos: int = 3) -> list[dict]:
    template = graphs.load_workflow(graphs.default_workflow(task))
    return [graphs.protect_graph(template, f"upload{k}.png", f"photo{k}", seed=7, folder="diffpriv-jobs/j")
            for k in range(photos)]


def crop(image: int, face: int) -> FaceCrop:
    return FaceCrop(image, face, (100, 120), (0, 0, 50), 64, (10.0, 10.0, 40.0, 40.0))


@pytest.mark.parametrize("task", ["anonymize_faces", "hide_faces", "anonymize_faces_target"])
def test_each_photo_keeps_its_own_nodes_and_the_stages_between_run_once(task):
    photos = photo_graphs(task)
    prompt = photo_batches.photos_prompt(photos)
    graph = prompt.graph
    by_class = {}
    for node_id, node in graph.items():
        by_class.setdefault(node["class_type"], []).append(node_id)
    for once in ("DiffPrivacyMSIInversion", "DiffPrivacyGuidedDDIMSampler", "DiffPrivacyDDIMInversionKey",
                 "VAEEncode", "VAEDecode", "CheckpointLoaderSimple"):
        assert len(by_class[once]) == 1, once
    for per_photo in ("LoadImage", "DiffPrivacyFaceDetect", "DiffPrivacyFaceCrop", "DiffPrivacyFacePaste",
                      "SaveImage", "DiffPrivacySaveKey"):
        assert len(by_class[per_photo]) == 3, per_photo
    assert len(by_class["DiffPrivacyFaceBatch"]) == 2  # a chain: photo 0 + 1, then + 2
    # Each copy is its photo's own node, as its one-photo graph has it (own upload, own names).
    for k, copies in enumerate(prompt.copies):
        for prompt_id, own_id in copies.items():
            node = graph[prompt_id]
            assert node["class_type"] == photos[k][own_id]["class_type"]
            if node["class_type"] == "LoadImage":
                assert node["inputs"]["image"] == f"upload{k}.png"
            if node["class_type"] == "DiffPrivacySaveKey":
                assert node["inputs"]["filename_prefix"] == f"diffpriv-jobs/j/photo{k}"
    # The shared stages take the joined crops; the sampler seeds each face within its photo.
    (last_join,) = [i for i in by_class["DiffPrivacyFaceBatch"]
                    if not any(graph[j]["inputs"].get("crops") == [i, 0] for j in by_class["DiffPrivacyFaceBatch"])]
    (msi,) = by_class["DiffPrivacyMSIInversion"]
    (sampler,) = by_class["DiffPrivacyGuidedDDIMSampler"]
    (encode,) = by_class["VAEEncode"]
    assert graph[msi]["inputs"]["image"] == [last_join, 0] and graph[msi]["inputs"]["crop_info"] == [last_join, 1]
    assert graph[encode]["inputs"]["pixels"] == [last_join, 0]
    assert graph[sampler]["inputs"]["crop_info"] == [last_join, 1]
    # Each photo's Face Paste and Save Privacy Key see only its rows, through its Photo Faces.
    for k, copies in enumerate(prompt.copies):
        (paste,) = [i for i, own in copies.items() if photos[k][own]["class_type"] == "DiffPrivacyFacePaste"]
        (save_key,) = [i for i, own in copies.items() if photos[k][own]["class_type"] == "DiffPrivacySaveKey"]
        for link in (graph[paste]["inputs"]["faces"], graph[save_key]["inputs"]["key_e"],
                     graph[save_key]["inputs"]["key_i"]):
            split = graph[link[0]]
            assert split["class_type"] == "DiffPrivacyPhotoFaces" and split["inputs"]["photo"] == k
            assert split["inputs"]["crop_info"] == [last_join, 1] and link[0] in prompt.splits[k]
        (own_crop,) = [i for i, own in copies.items() if photos[k][own]["class_type"] == "DiffPrivacyFaceCrop"]
        assert graph[paste]["inputs"]["crop_info"] == [own_crop, 1], "its key records its own photo's crop"
    # No link points at a node the prompt lacks.
    assert all(str(v[0]) in graph for node in graph.values() for v in node["inputs"].values() if isinstance(v, list))


def test_whole_image_workflows_and_photos_that_differ_do_not_share_a_prompt():
    whole = graphs.load_workflow(graphs.default_workflow("anonymize"))
    assert "Face Crop" in photo_batches.grouping_problem(whole)
    assert photo_batches.grouping_problem(photo_graphs(photos=1)[0]) is None
    photos = photo_graphs(photos=2)
    photos[1]["12"]["inputs"]["seed"] = 99  # a shared stage set otherwise for one photo
    with pytest.raises(ValueError, match="differ outside their own nodes"):
        photo_batches.photos_prompt(photos)


def test_a_shared_stage_that_reads_the_photo_itself_or_seeds_by_place_is_refused():
    (template,) = photo_graphs(photos=1)
    template["11"]["inputs"]["image"] = ["3", 0]  # the guidance reads the Load Image, not the crops
    assert "not from its Face Crop" in photo_batches.grouping_problem(template)
    (template,) = photo_graphs(photos=1)
    template["20"] = {"class_type": "KSampler", "inputs": {"seed": 1, "latent_image": ["6", 0]}}
    assert "seeds its batch by place" in photo_batches.grouping_problem(template)


def test_each_photo_gets_its_own_outputs_and_the_reports_of_its_faces_renumbered():
    photos = photo_graphs(photos=2)
    prompt = photo_batches.photos_prompt(photos)
    ids = [{own: prompt_id for prompt_id, own in copies.items()} for copies in prompt.copies]
    outputs = {
        ids[0]["4"]: {"diffprivacy_faces": [{"image": 0, "faces": ["photo 0's"]}]},
        ids[1]["4"]: {"diffprivacy_faces": [{"image": 0, "faces": ["photo 1's"]}]},
        ids[1]["17"]: {"diffprivacy_keys": [{"filename": "photo1_face0_00001.dpkey.safetensors"}]},
        "12": {"passes": [{"image": i, "stage": "Guided DDIM Sampler", "passes": {"unet_forward": i},
                           "batch": [0, 1, 2]} for i in range(3)],
               "identity_similarity": [{"image": i, "cosines": [i / 10]} for i in range(3)]},
        "8": {"images": [{"filename": "loss.png", "type": "temp"}]},
    }
    for k, (first, faces) in enumerate(((0, 2), (2, 1))):
        for split in prompt.splits[k]:
            outputs[split] = {"diffprivacy_photo": [{"photo": k, "first": first, "faces": faces}]}
    result = PromptResult("p", outputs, {"status_str": "success"})
    second = prompt.photo_result(result, 1)
    assert second.outputs["4"] == {"diffprivacy_faces": [{"image": 0, "faces": ["photo 1's"]}]}
    assert second.files("17", "diffprivacy_keys") == [{"filename": "photo1_face0_00001.dpkey.safetensors"}]
    assert second.outputs["12"]["passes"] == [{"image": 0, "stage": "Guided DDIM Sampler",
                                               "passes": {"unet_forward": 2}, "batch": [0, 1, 2]}]
    assert second.outputs["12"]["identity_similarity"] == [{"image": 0, "cosines": [0.2]}]
    first = prompt.photo_result(result, 0)
    assert [e["image"] for e in first.outputs["12"]["passes"]] == [0, 1]
    assert first.outputs["4"]["diffprivacy_faces"][0]["faces"] == ["photo 0's"]
    assert not any(node_id.startswith("photo") for node_id in first.outputs), "keyed as its own graph's nodes"
    for split in prompt.splits[1]:
        outputs[split] = {"diffprivacy_photo": [{"photo": 1, "first": "2", "faces": 1}]}
    with pytest.raises(ValueError, match="cannot be read"):
        prompt.photo_result(result, 1)
    for split in prompt.splits[1]:  # more faces than a photo can hold
        outputs[split] = {"diffprivacy_photo": [{"photo": 1, "first": 2, "faces": 10 ** 9}]}
    with pytest.raises(ValueError, match="cannot be read"):
        prompt.photo_result(result, 1)
    for split in prompt.splits[1]:
        del outputs[split]
    with pytest.raises(ValueError, match="did not say"):
        prompt.photo_result(result, 1)


def test_jobs_go_into_prompts_of_at_most_n_photos():
    jobs = [Job(f"p{k}", None, lambda session: {}) for k in range(5)]
    grouped = in_prompts(jobs, 2)
    assert [[j.name for j in job.photos] for job in grouped] == [["p0", "p1"], ["p2", "p3"], []]
    assert grouped[2] is jobs[4] and grouped[0].name == "p0 + p1"
    assert in_prompts(jobs, 1) == jobs


class FakeClient:
    def __init__(self, stats):
        self.stats = stats

    def get(self, path):
        assert path == "/system_stats"
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats


class FakeServer:
    def __init__(self, stats):
        self.client = FakeClient(stats)


def test_photos_share_a_prompt_by_default_only_where_a_server_has_a_gpu():
    cpu = FakeServer({"devices": [{"name": "cpu", "type": "cpu"}]})
    gpu = FakeServer({"devices": [{"name": "cuda:0 NVIDIA H200", "type": "cuda"}]})
    down = FakeServer(OSError("refused"))
    assert photo_batches.photos_per_prompt([cpu], None) == 1
    assert photo_batches.photos_per_prompt([cpu, gpu], None) == photo_batches.GPU_PHOTOS_PER_PROMPT
    assert photo_batches.photos_per_prompt([down], None) == 1
    assert photo_batches.photos_per_prompt([cpu], 3) == 3


def test_joined_crops_number_the_photos_and_keep_each_face_index():
    first, second = [crop(0, 0), crop(0, 1)], [crop(0, 0)]
    joined = join_crops(first, second)
    assert [(c.image_index, c.face_index) for c in joined] == [(0, 0), (0, 1), (1, 0)]
    assert noise_indices(joined) == [0, 1, 0], "a face is seeded by its index within its own photo"
    third = join_crops(joined, [crop(0, 0), crop(0, 1)])
    assert [c.image_index for c in third] == [0, 0, 1, 2, 2]
    assert photo_rows(third, 2) == range(3, 5)
    candidates = [f"face {n} candidate {c}" for n in range(5) for c in range(2)]
    assert rows_of(candidates, photo_rows(third, 1), 5, "faces") == ["face 2 candidate 0", "face 2 candidate 1"]
    assert rows_of(["one key-E for all"], photo_rows(third, 2), 5, "key_e") == ["one key-E for all"]
    with pytest.raises(ValueError, match="no face of photo 3"):
        photo_rows(third, 3)
    with pytest.raises(ValueError, match="7 entries for 5 faces"):
        rows_of(list(range(7)), photo_rows(third, 0), 5, "faces")


def test_a_workflow_whose_faces_cannot_share_a_batch_runs_one_photo_a_prompt_and_says_why(capsys):
    whole = graphs.load_workflow(graphs.default_workflow("anonymize"))
    args = build_parser().parse_args(["protect", "a.png", "--task", "anonymize", "--out", "o",
                                      "--photos-per-prompt", "4"])
    assert photos_per_prompt(args, whole, Connection([FakeServer({"devices": [{"type": "cuda"}]})])) == 1
    assert "--photos-per-prompt: the workflow has 0 Face Crop" in capsys.readouterr().err
    assert photos_per_prompt(args, photo_graphs(photos=1)[0], Connection([])) == 4


@pytest.mark.parametrize("extra, words", [(["--photos-per-prompt", "17"], "1 <= N <= 16"),
                                          (["--photos-per-prompt", "2", "--ray"], "with --ray each actor")])
def test_photos_per_prompt_is_refused_out_of_range_and_with_ray(tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as stopped:
        main(["protect", str(tmp_path / "a.png"), "--task", "anonymize", "--out", str(tmp_path / "o"), *extra])
    assert stopped.value.code == 2 and words in capsys.readouterr().err
