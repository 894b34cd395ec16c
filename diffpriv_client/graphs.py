"""API-format workflow templates and the few inputs the `diffpriv` command fills in.

A template is the JSON that ComfyUI's "Export (API)" writes: ``{node_id: {"class_type",
"inputs"}}``. The command patches nodes by class type, never by node id, so any graph made
of the same nodes works. Inputs that hold a link (``[node_id, output_index]``) are never
overwritten: a seed fed from another node stays fed from it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from .embedded import PACK_DIR

DEFAULT_WORKFLOWS = PACK_DIR / "example_workflows" / "api"
OUTPUT_PREFIX = "diffpriv"
# Model loaders whose file choice must exist on the server before anything is queued:
# class_type -> (input name, models sub-folder).
MODEL_INPUTS = {
    "CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
    "CLIPVisionLoader": ("clip_name", "clip_vision"),
}
# Stock samplers name their seed `noise_seed`; the pack's nodes and KSampler say `seed`.
SEED_INPUTS = ("seed", "noise_seed")


def default_workflow(task: str) -> Path:
    return DEFAULT_WORKFLOWS / f"{task}.json"


def load_workflow(path: str | Path) -> dict:
    """Read an API-format graph; refuse the UI format (what the editor saves) by name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow {path} not found: pass --workflow FILE (an API-format export)")
    graph = json.loads(path.read_text())
    if "nodes" in graph and "links" in graph:
        raise ValueError(f"{path} is a UI-format workflow; export it with 'Export (API)' instead")
    return graph


def nodes_of(graph: dict, class_type: str) -> list[dict]:
    return [node for node in graph.values() if node.get("class_type") == class_type]


def _is_link(value) -> bool:
    return isinstance(value, list)


def _set_literal(graph: dict, input_names: tuple[str, ...], value) -> int:
    """Set every unlinked input with one of these names, in any node; returns how many."""
    count = 0
    for node in graph.values():
        inputs = node.get("inputs", {})
        for name in input_names:
            if name in inputs and not _is_link(inputs[name]):
                inputs[name] = value
                count += 1
    return count


def _set_on(graph: dict, class_type: str, **values) -> None:
    nodes = nodes_of(graph, class_type)
    if not nodes:
        raise ValueError(f"the workflow has no {class_type} node")
    for node in nodes:
        node.setdefault("inputs", {}).update(values)


def set_seed(graph: dict, seed: int) -> None:
    _set_literal(graph, SEED_INPUTS, seed)


def set_steps(graph: dict, steps: int) -> None:
    """Every steps input (a set value wins over a node's task preset)."""
    _set_literal(graph, ("steps",), steps)


def set_input_image(graph: dict, image_name: str) -> None:
    _set_on(graph, "LoadImage", image=image_name)


def set_key_output(graph: dict, stem: str, passphrase: str, folder: str = OUTPUT_PREFIX) -> None:
    """Key files go to the output folder (the only one /view serves), named after the image,
    in ``folder`` (the job's)."""
    _set_on(graph, "DiffPrivacySaveKey", folder="output", filename_prefix=f"{folder}/{stem}",
            passphrase=passphrase)


def set_key_input(graph: dict, key_name: str, passphrase: str) -> None:
    _set_on(graph, "DiffPrivacyLoadKey", key_name=key_name, passphrase=passphrase)


def set_image_prefixes(graph: dict, stem: str, folder: str = OUTPUT_PREFIX) -> None:
    """Name saved pictures after the input, keeping what the template called each one, in
    ``folder`` (the job's)."""
    for node in nodes_of(graph, "SaveImage"):
        label = Path(str(node["inputs"].get("filename_prefix", "image"))).name
        node["inputs"]["filename_prefix"] = f"{folder}/{stem}_{label}"


def output_labels(graph: dict) -> dict[str, str]:
    """Node id -> the label the command names that node's downloaded files after: the
    file name part of the prefix it set (never a name the server reports)."""
    return {node_id: Path(str(node["inputs"].get("filename_prefix", node_id))).name for node_id, node in graph.items()
            if node.get("class_type") in ("SaveImage", "DiffPrivacySaveKey")}


def set_models(graph: dict, files: dict[str, str]) -> None:
    """Point every model loader at another file, by models sub-folder (used by --demo-weights)."""
    for class_type, (input_name, folder) in MODEL_INPUTS.items():
        if folder in files:
            for node in nodes_of(graph, class_type):
                node["inputs"][input_name] = files[folder]


def set_face_recognizer(graph: dict, option: str, threshold: float = 0.0) -> None:
    """Point every face recogniser loader at another file ("<folder>/<file>", used by
    --demo-weights), with its same-person ``threshold`` (0: the file is known by its content)."""
    for node in nodes_of(graph, "DiffPrivacyFaceRecognizerLoader"):
        node["inputs"]["model_name"] = option
        node["inputs"]["threshold"] = threshold


def set_target_similarity(graph: dict, margin: float | None = None) -> None:
    """Every Identity Energy Guidance guides to a target similarity (the recogniser's
    threshold minus ``margin`` to anonymize, plus it to hide) instead of the paper's fixed
    lambda_t; ``margin`` None keeps the workflow's."""
    nodes = nodes_of(graph, "DiffPrivacyIdentityGuidance")
    if not nodes:
        raise ValueError("--target-similarity needs an Identity Energy Guidance (DiffPrivacyIdentityGuidance) node "
                         "in the workflow; it has none")
    values = {"lambda_mode": "target similarity", **({} if margin is None else {"margin": margin})}
    for node in nodes:
        inputs = node.setdefault("inputs", {})
        inputs.update({name: value for name, value in values.items() if not _is_link(inputs.get(name))})


FACE_DETECT = "DiffPrivacyFaceDetect"
DETECTOR_MIN_SCORE = {"mtcnn": 0.7, "centerface": 0.3}  # Face Detect's defaults per detector (BENCHMARKS.md)


def set_face_detection(graph: dict, min_size: int | None = None, min_score: float | None = None,
                       detector: str | None = None) -> None:
    """Every Face Detect finds faces down to ``min_size`` px, from ``min_score``, with
    ``detector`` (None keeps the workflow's). A detector chosen without a score gets that
    detector's default score: their scores are on different scales."""
    nodes = nodes_of(graph, FACE_DETECT)
    if not nodes:
        raise ValueError("--min-face-size, --min-face-score and --detector need a Face Detect "
                         f"({FACE_DETECT}) node in the workflow; it has none (a whole-image workflow?)")
    if detector is not None and min_score is None:
        min_score = DETECTOR_MIN_SCORE.get(detector)
    values = {"min_size": min_size, "min_score": min_score, "detector": detector}
    for node in nodes:
        inputs = node.setdefault("inputs", {})
        inputs.update({name: value for name, value in values.items()
                       if value is not None and not _is_link(inputs.get(name))})


# The paper's ablations `diffpriv protect` can switch a workflow to, by the name a summary
# entry records them under, and what the report calls them.
ABLATIONS = {"no-guidance": "w/o energy guidance (Table 5)",
             "one-embedding": "one embedding, Ours-OE (Table 6)"}
SAMPLERS = ("DiffPrivacyGuidedDDIMSampler", "DiffPrivacyGuidedDDIM")


def _set_everywhere(graph: dict, class_type: str, name: str, value, switch: str) -> None:
    """``name`` = ``value`` on every node of ``class_type``; one that takes it from a link
    cannot be switched, and is refused rather than left as it is."""
    nodes = nodes_of(graph, class_type)
    if not nodes:
        raise ValueError(f"{switch} needs a {class_type} node in the workflow; it has none")
    for node in nodes:
        inputs = node.setdefault("inputs", {})
        if _is_link(inputs.get(name)):
            raise ValueError(f"{switch}: the workflow's {class_type} takes '{name}' from another node, so it "
                             "cannot be set; set it in the workflow instead")
        inputs[name] = value


def set_no_guidance(graph: dict) -> None:
    """The paper's Table 5 ablation: DDIM with the scheduled key-E and no energy guidance
    (every Identity Energy Guidance's lambda_scale 0: the sampler skips the correction)."""
    if not any(nodes_of(graph, sampler) for sampler in SAMPLERS):
        raise ValueError("--no-guidance needs a Guided DDIM Sampler (DiffPrivacyGuidedDDIMSampler or the "
                         "DiffPrivacyGuidedDDIM SAMPLER) in the workflow; it has none")
    if nodes_of(graph, "DiffPrivacyIdentityGuidance"):
        _set_everywhere(graph, "DiffPrivacyIdentityGuidance", "lambda_scale", 0.0, "--no-guidance")


def set_one_embedding(graph: dict) -> None:
    """The paper's Table 6 ablation, Ours-OE: every MSI Inversion learns one conditioning
    from the last CLIP layer, without time modulation, for every stage."""
    _set_everywhere(graph, "DiffPrivacyMSIInversion", "one_embedding", True, "--one-embedding")


def _guides(node: dict | None) -> bool:
    """Whether an Identity Energy Guidance node's lambda_t can be other than 0 (a value fed by
    a link might be anything)."""
    if node is None or node.get("class_type") != "DiffPrivacyIdentityGuidance":
        return False
    inputs = node.get("inputs", {})
    if inputs.get("lambda_scale", 1.0) == 0:
        return False
    return not (inputs.get("lambda_early", -1.0) == 0 and inputs.get("lambda_late", -1.0) == 0)


def ablations(graph: dict) -> list[str]:
    """The paper's ablations a protect graph runs (ABLATIONS' names; empty for the method
    itself): no sampler guided by a guidance that can act, an MSI with one embedding."""
    found = []
    samplers = [node for sampler in SAMPLERS for node in nodes_of(graph, sampler)]
    if samplers and not any(_is_link(link := node.get("inputs", {}).get("guidance"))
                            and _guides(graph.get(str(link[0]))) for node in samplers):
        found.append("no-guidance")
    if any(node.get("inputs", {}).get("one_embedding") is True for node in nodes_of(graph, "DiffPrivacyMSIInversion")):
        found.append("one-embedding")
    return found


# The nodes a workflow needs for what the command fills in (docs/cli.md, "Your own workflows").
NODE_ROLES = {"LoadImage": "Load Image (LoadImage), which gets the photo",
              "DiffPrivacySaveKey": "Save Privacy Key (DiffPrivacySaveKey), which writes the key",
              "DiffPrivacyLoadKey": "Load Privacy Key (DiffPrivacyLoadKey), which gets the key"}
REQUIRED_NODES = {"protect": ("LoadImage", "DiffPrivacySaveKey"), "recover": ("DiffPrivacyLoadKey",),
                  "recover --photo": ("DiffPrivacyLoadKey", "LoadImage")}


def missing_nodes(graph: dict, command: str) -> list[str]:
    """What the graph lacks of the nodes ``command`` fills in, in words."""
    return [NODE_ROLES[class_type] for class_type in REQUIRED_NODES[command] if not nodes_of(graph, class_type)]


def msi_sees_the_photo(graph: dict) -> bool:
    """Whether an MSI Inversion trains on the uploaded photo itself (the whole-image
    workflows) rather than on face crops: then MSI's size limits hold for the photo."""
    for node in nodes_of(graph, "DiffPrivacyMSIInversion"):
        source = node.get("inputs", {}).get("image")
        if _is_link(source) and graph.get(str(source[0]), {}).get("class_type") == "LoadImage":
            return True
    return False


def pasted_saves(graph: dict) -> set[str]:
    """The SaveImage nodes that save a Face Paste's photos (the protected photos of the
    every-face workflows)."""
    return {node_id for node_id, node in graph.items() if node.get("class_type") == "SaveImage"
            and _is_link(source := node.get("inputs", {}).get("images"))
            and graph.get(str(source[0]), {}).get("class_type") == "DiffPrivacyFacePaste" and source[1] == 0}


def required_models(graph: dict) -> dict[str, set[str]]:
    """The model files the graph loads: {models sub-folder: {file names}}."""
    wanted: dict[str, set[str]] = {}
    for class_type, (input_name, folder) in MODEL_INPUTS.items():
        for node in nodes_of(graph, class_type):
            wanted.setdefault(folder, set()).add(node["inputs"][input_name])
    return wanted


def ancestors(graph: dict, node_id: str) -> set[str]:
    """The node and every node it depends on through links."""
    seen, todo = set(), [str(node_id)]
    while todo:
        current = todo.pop()
        if current in seen or current not in graph:
            continue
        seen.add(current)
        todo += [str(v[0]) for v in graph[current].get("inputs", {}).values() if _is_link(v)]
    return seen


def reconstruction_graph(template: dict, label: str = "reconstruction") -> dict:
    """From an every-face protect template: each face's crop through the VAE and back (encode,
    decode), pasted the way a recovered face is (Face Paste's ``restore``) into the picture of
    the Load Image ``reconstruction_photo`` (the protected photo, which a recovery goes back
    into): what a perfect recovery gives. Built from the template's own nodes, so the faces,
    crops and mask are the same."""
    (encode_id,) = [i for i, n in template.items() if n.get("class_type") == "VAEEncode"]
    (paste,) = nodes_of(template, "DiffPrivacyFacePaste")
    graph = {i: copy.deepcopy(template[i]) for i in ancestors(template, encode_id)}
    vae = template[encode_id]["inputs"]["vae"]
    graph["reconstruction_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [encode_id, 0], "vae": vae}}
    graph["reconstruction_photo"] = {"class_type": "LoadImage", "inputs": {"image": ""}}
    graph["reconstruction_paste"] = {"class_type": "DiffPrivacyFacePaste", "inputs": dict(
        paste["inputs"], faces=["reconstruction_decode", 0], image=["reconstruction_photo", 0], restore=True)}
    graph["reconstruction_save"] = {"class_type": "SaveImage", "inputs": {
        "images": ["reconstruction_paste", 0], "filename_prefix": label}}
    missing = [v for v in graph["reconstruction_paste"]["inputs"].values() if _is_link(v) and str(v[0]) not in graph]
    if missing:
        raise ValueError("the workflow's Face Paste takes inputs that do not lead to its VAE Encode: "
                         "no reconstruction to compare with")
    return graph


def protect_graph(template: dict, image_name: str, stem: str, passphrase: str = "",
                  seed: int | None = None, steps: int | None = None, folder: str = OUTPUT_PREFIX,
                  recipient: str = "") -> dict:
    """The template, filled in for one uploaded picture; outputs go to ``folder``, keys
    encrypted to ``recipient`` when one is given."""
    graph = copy.deepcopy(template)
    set_input_image(graph, image_name)
    set_key_output(graph, stem, passphrase, folder)
    if recipient:
        _set_on(graph, "DiffPrivacySaveKey", recipient=recipient)
    set_image_prefixes(graph, stem, folder)
    if seed is not None:
        set_seed(graph, seed)
    if steps is not None:
        set_steps(graph, steps)
    return graph


def recover_graph(template: dict, key_name: str, stem: str, passphrase: str = "", image_name: str | None = None,
                  folder: str = OUTPUT_PREFIX) -> dict:
    """The template for one key; ``image_name``: the uploaded photo a recovered face goes back
    into; outputs go to ``folder``."""
    graph = copy.deepcopy(template)
    set_key_input(graph, key_name, passphrase)
    if image_name is not None:
        set_input_image(graph, image_name)
    set_image_prefixes(graph, stem, folder)
    return graph
