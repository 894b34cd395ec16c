"""Several photos in one prompt: the every-face graph of each photo, joined where its faces
can share a batch, and each photo's part of the result taken back out.

On a GPU a UNet call on a few latents takes about as long as on one, so a photo with one
face leaves MSI's, the sampler's and key-I's batches mostly empty. Filled in for several
photos, the one-photo template becomes one prompt in which each photo keeps its own nodes
before its faces are cut out (Load Image, Face Detect, Face Crop) and after they are
protected (Face Paste, the saves), while the stages between them run once for every face
of every photo: Face Batch joins the crops, Photo Faces gives each photo its own rows of
the pictures and keys back. Each face keeps its own key-E, key-I and start noise (the
sampler gets the joined crop_info), so each photo's pictures and keys are those of a
prompt of its own, float rounding aside.

The result is taken back out per photo as the result of that photo's own graph (the
template filled in for it alone): its nodes' outputs under the template's node ids, and
the shared stages' reports of its faces, renumbered from 0. So everything the command does
with a one-photo result (download, verify.check_protected, the summary's passes and
identity) works on it unchanged. Shared stages' calls are made once for the whole prompt:
each photo's ``calls`` are those of the prompt it shared.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from diffpriv_core.job_protocol import MAX_UPLOADS_PER_JOB
from diffpriv_core.key_format import MAX_FACES

from . import graphs
from .comfy_http import ComfyClient, PromptResult

FACE_CROP = "DiffPrivacyFaceCrop"
FACE_BATCH = "DiffPrivacyFaceBatch"
PHOTO_FACES = "DiffPrivacyPhotoFaces"
# The nodes from which on a photo's graph is its own again: they write its files.
PHOTO_OUTPUTS = ("DiffPrivacyFacePaste", "DiffPrivacySaveKey", "SaveImage")
# Outputs of the shared stages a photo's own nodes may take, by the Photo Faces input
# that gives the photo its rows of them.
SPLITS = {("VAEDecode", 0): "faces", ("DiffPrivacyMSIInversion", 0): "key_e",
          ("DiffPrivacyDDIMInversionKey", 0): "key_i"}
SPLIT_OUTPUT = {"faces": 0, "key_e": 1, "key_i": 2}  # Photo Faces' output of each
SEEDED_BY_CROPS = "DiffPrivacyGuidedDDIMSampler"  # seeds each face by its index within its photo, given crop_info
# The seeded stages that give a face the same result in any batch: MSI seeds every image's
# training alike, the sampler as above. Another seeded node (a stock sampler's noise) seeds
# by place in the batch, which joining photos would change.
SEEDED_PER_FACE = (SEEDED_BY_CROPS, "DiffPrivacyMSIInversion")
ROWS_REPORT = "diffprivacy_photo"  # Photo Faces' history output: the photo's rows of the batch
# On a GPU a few faces per UNet call cost about as much time as one; on a CPU every face
# costs its own time, so joining photos gains nothing there.
GPU_PHOTOS_PER_PROMPT = 4
MAX_PHOTOS_PER_PROMPT = MAX_UPLOADS_PER_JOB  # a prompt's photos are uploads of one job


class NotGroupable(ValueError):
    """The workflow's faces cannot be joined across photos (the reason says why)."""


def _links(node: dict) -> list[tuple[str, list]]:
    return [(name, value) for name, value in node.get("inputs", {}).items() if isinstance(value, list)]


def _descendants(graph: dict, roots: set[str]) -> set[str]:
    """``roots`` and every node that depends on one of them through links."""
    found = set(roots)
    grew = True
    while grew:
        grew = False
        for node_id, node in graph.items():
            if node_id not in found and any(str(link[0]) in found for _name, link in _links(node)):
                found.add(node_id)
                grew = True
    return found


def _of_class(graph: dict, *class_types: str) -> set[str]:
    return {node_id for node_id, node in graph.items() if node.get("class_type") in class_types}


def photo_nodes(graph: dict) -> set[str]:
    """The nodes each photo gets its own copy of: those that depend on its Load Image up to
    its Face Crop, and every node from a Face Paste, Save Privacy Key or Save Image on."""
    crops = _of_class(graph, FACE_CROP)
    if len(crops) != 1:
        raise NotGroupable(f"the workflow has {len(crops)} Face Crop ({FACE_CROP}) nodes; photos can share a "
                           "prompt only through exactly one (an every-face workflow)")
    after_crops = _descendants(graph, crops) - crops
    return (_descendants(graph, _of_class(graph, "LoadImage")) - after_crops) \
        | _descendants(graph, _of_class(graph, *PHOTO_OUTPUTS))


@dataclass
class PhotosPrompt:
    """One prompt for several photos, and how each photo's own graph maps into it."""

    graph: dict
    photos: list[dict]  # each photo's own graph: the template filled in for it alone
    copies: list[dict[str, str]]  # per photo: node id in the prompt -> node id in its own graph
    shared: set[str]  # nodes that run once for every photo
    splits: list[list[str]]  # per photo: its Photo Faces nodes

    def photo_result(self, result: PromptResult, photo: int) -> PromptResult:
        """What the prompt gave ``photo``, as a prompt of its own graph would have: its own
        nodes' outputs, and the shared nodes' reports of its faces, numbered from 0.
        ValueError when no Photo Faces says which faces of the batch are the photo's."""
        first, faces = self._rows(result, photo)
        outputs = {}
        for node_id, output in result.outputs.items():
            if node_id in self.copies[photo]:
                outputs[self.copies[photo][node_id]] = output
            elif node_id in self.shared and isinstance(output, dict):
                outputs[node_id] = {kind: _faces_of(value, first, faces) for kind, value in output.items()}
        return PromptResult(result.prompt_id, outputs, result.status)

    def _rows(self, result: PromptResult, photo: int) -> tuple[int, int]:
        """(first row, faces) of the photo in the joined batch, as its Photo Faces reported
        them (a server's answer is checked, not trusted)."""
        reported = {(entry.get("first"), entry.get("faces")) for node_id in self.splits[photo]
                    for entry in (result.outputs.get(node_id) or {}).get(ROWS_REPORT) or []
                    if isinstance(entry, dict) and entry.get("photo") == photo}
        if len(reported) != 1:
            raise ValueError(f"the server did not say which faces of the shared batch are photo {photo}'s")
        ((first, faces),) = reported
        if not (type(first) is int and type(faces) is int and 0 <= first < MAX_FACES * len(self.photos)
                and 0 < faces <= MAX_FACES):
            raise ValueError(f"the server's rows of photo {photo} in the shared batch cannot be read")
        return first, faces


def _faces_of(value, first: int, faces: int):
    """A shared node's history output for one photo: entries about an image of the batch
    (``image``: passes, similarities) are kept for the photo's faces only, renumbered from 0;
    everything else as it is."""
    if not isinstance(value, list):
        return value
    kept = []
    for entry in value:
        if isinstance(entry, dict) and type(entry.get("image")) is int:
            if first <= entry["image"] < first + faces:
                kept.append(dict(entry, image=entry["image"] - first))
        else:
            kept.append(entry)
    return kept


def photos_prompt(photos: list[dict]) -> PhotosPrompt:
    """One prompt for ``photos``, each the template filled in for one photo (graphs.protect_graph),
    with the same nodes but the photo's own upload and file names. NotGroupable when the
    workflow's faces cannot share a batch."""
    if len(photos) < 2:
        raise ValueError("a prompt of several photos needs at least two")
    template = photos[0]
    own = photo_nodes(template)
    shared = set(template) - own
    for photo in photos[1:]:
        if set(photo) != set(template) or any(photo[i] != template[i] for i in shared):
            raise ValueError("the photos' graphs differ outside their own nodes: they cannot share a prompt")
    builder = _Builder(template, own, len(photos))
    for node_id in shared:
        builder.add_shared(node_id)
    for k, photo in enumerate(photos):
        for node_id in own:
            builder.add_own(photo, node_id, k)
    return PhotosPrompt(builder.graph, photos, builder.copies, shared, builder.splits)


class _Builder:
    """The prompt of ``photos`` photos of ``template``, node by node: each photo's copies of
    the ``own`` nodes, its Face Crop's crops joined by a chain of Face Batch nodes, the
    shared nodes taking the joined crops, and a Photo Faces wherever a photo's own node
    takes a shared node's output."""

    def __init__(self, template: dict, own: set[str], photos: int):
        self.template, self.own = template, own
        (self.crop,) = _of_class(template, FACE_CROP)
        self.after_crops = _descendants(template, {self.crop}) - {self.crop}
        self.taken = set(template)
        self.copies = [{self._free(f"photo{k}_{node_id}"): node_id for node_id in own} for k in range(photos)]
        self.copy_of = [{node_id: prompt_id for prompt_id, node_id in c.items()} for c in self.copies]
        self.splits: list[list[str]] = [[] for _ in range(photos)]
        self.graph: dict = {}
        self.joined = self._join(photos)

    def _free(self, wanted: str) -> str:
        """A node id for the prompt that is none of the template's."""
        while wanted in self.taken:
            wanted = f"_{wanted}"
        return wanted

    def _join(self, photos: int) -> tuple[list, list]:
        """The links to every photo's crops and crop_info, joined photo by photo."""
        crops = [self.copy_of[k][self.crop] for k in range(photos)]
        joined = [crops[0], 0], [crops[0], 1]
        for k in range(1, photos):
            join = self._free(f"face_batch{k}")
            self.graph[join] = {"class_type": FACE_BATCH, "inputs": {
                "crops": joined[0], "crop_info": joined[1], "crops_2": [crops[k], 0], "crop_info_2": [crops[k], 1]}}
            joined = [join, 0], [join, 1]
        return joined

    def add_shared(self, node_id: str) -> None:
        node = self.graph[node_id] = copy.deepcopy(self.template[node_id])
        kind = node.get("class_type")
        if kind not in SEEDED_PER_FACE and set(node.get("inputs", {})) & set(graphs.SEED_INPUTS):
            raise NotGroupable(f"the workflow's {kind} seeds its batch by place, so a face's result would depend "
                               "on the photos sharing its prompt")
        for name, link in _links(node):
            source = str(link[0])
            if source in self.own:
                if source != self.crop or link[1] not in (0, 1):
                    raise NotGroupable(f"the workflow's {kind} takes '{name}' from the photo's "
                                       f"{self.template[source].get('class_type')}, not from its Face Crop: its "
                                       "faces cannot share a batch with other photos'")
                node["inputs"][name] = list(self.joined[link[1]])
        if kind == SEEDED_BY_CROPS:
            node["inputs"]["crop_info"] = list(self.joined[1])

    def add_own(self, photo: dict, node_id: str, k: int) -> None:
        node = self.graph[self.copy_of[k][node_id]] = copy.deepcopy(photo[node_id])
        for name, link in _links(node):
            source = str(link[0])
            if source in self.own:
                node["inputs"][name] = [self.copy_of[k][source], link[1]]
            elif source in self.after_crops:
                node["inputs"][name] = self._split(link, k, name)

    def _split(self, link: list, k: int, name: str) -> list:
        """The link to a Photo Faces that gives photo ``k`` its rows of the shared output ``link``."""
        source = str(link[0])
        source_class = self.template[source].get("class_type")
        kind = SPLITS.get((source_class, link[1]))
        if kind is None:
            raise NotGroupable(f"a photo's own nodes take '{name}' from the shared {source_class}, which cannot be "
                               "split per photo: its faces cannot share a batch with other photos'")
        node_id = self._free(f"photo{k}_{kind}_of_{source}")
        if node_id not in self.graph:
            self.graph[node_id] = {"class_type": PHOTO_FACES, "inputs": {
                "crop_info": list(self.joined[1]), "photo": k, kind: [source, link[1]]}}
            self.splits[k].append(node_id)
        return [node_id, SPLIT_OUTPUT[kind]]


def grouping_problem(template: dict) -> str | None:
    """Why photos of this workflow cannot share a prompt (None: they can)."""
    try:
        photos_prompt([template, copy.deepcopy(template)])
    except NotGroupable as exc:
        return str(exc)
    return None


def photos_per_prompt(servers: list, asked: int | None) -> int:
    """How many photos one prompt holds: ``asked`` (--photos-per-prompt), else
    GPU_PHOTOS_PER_PROMPT when a server computes on another device than its CPU (ComfyUI's
    /system_stats lists its devices), else 1."""
    if asked is not None:
        return asked
    return GPU_PHOTOS_PER_PROMPT if any(has_accelerator(server.client) for server in servers) else 1


def has_accelerator(client: ComfyClient) -> bool:
    """Whether the server computes on a GPU (or another device than its CPU)."""
    try:
        devices = client.get("/system_stats").get("devices") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(isinstance(d, dict) and d.get("type") not in (None, "cpu") for d in devices)
