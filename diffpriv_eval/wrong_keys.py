"""The wrong-key experiment (the paper's Fig. 7): each photo recovered with its own pair of
keys and with pairs that do not belong together, to show that only the right pair brings
the face back.

For the key files sorted by name, photo X's next photo O and the one after it O2 (taken in
a circle), the variants are:

    right pair    X's key-I with X's key-E (what `diffpriv recover` gives)
    wrong key-I   O's key-I with X's key-E
    wrong key-E   X's key-I with O's key-E
    UC as key-E   X's key-I with the unconditional embedding (the empty prompt) at every stage
    both wrong    O's key-I with O2's key-E (needs the keys of three photos)

They run on ComfyUI through its HTTP API, as `diffpriv recover` does (each key opened here and
sent opened only to the embedded server or one named with --trust-server), with the recover
workflow's checkpoint and VAE and the pack's Wrong-Key Experiment node, which runs recovery's
DDIM without the pair check. Only the pictures come back: no key file is written, and
Recover still refuses keys that do not belong together.
"""
from __future__ import annotations

import argparse
import copy
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffpriv_client import graphs
from diffpriv_client.cli import key_stem
from diffpriv_core.key_format import CROP_META, KEY_SUFFIX, read_public_metadata
from diffpriv_eval.images import Case, load_at_size, original_stem

EXPERIMENT_NODE = "DiffPrivacyWrongKeyExperiment"
OUTPUT_FOLDER = "wrong_keys"  # inside the report folder: the pictures and their summary.json


@dataclass(frozen=True)
class Variant:
    name: str  # the pictures' file label and the results' key
    title: str
    key_i: int  # whose key-I: 0 the photo's own, 1 the next photo's
    key_e: int | None  # whose key-E: 0 own, 1 next, 2 the one after; None: UC (of the own key-E)

    def keys(self) -> str:
        """In words, which keys the variant uses."""
        whose = ("the photo's", "another photo's", "a third photo's")
        key_e = "the unconditional embedding" if self.key_e is None else f"{whose[self.key_e]} key-E"
        return f"{whose[self.key_i]} key-I, {key_e}"


VARIANTS = (Variant("right_pair", "right pair", 0, 0), Variant("wrong_key_i", "wrong key-I", 1, 0),
            Variant("wrong_key_e", "wrong key-E", 0, 1), Variant("uc_as_key_e", "UC as key-E", 0, None),
            Variant("both_wrong", "both wrong", 1, 2))
MIN_KEYS = 2  # "both wrong" needs a third


@dataclass
class KeyCase:
    """One key file, the original it belongs to and the keys of the photos after it."""

    key: Path
    case: Case  # named after the key; its original is the photo, or the key's face crop of it
    others: tuple[Path, Path]  # the next photo's key file and the one after it (the own again for two keys)

    def variants(self) -> list[Variant]:
        """The variants these keys can run: "both wrong" needs a third photo's key."""
        return [v for v in VARIANTS if v.key_e != 2 or self.others[1] != self.key]

    def files(self) -> tuple[Path, Path, Path]:
        return (self.key, *self.others)


def key_files(paths: list[Path]) -> list[Path]:
    """Key files among ``paths``: files, and folders searched to any depth (a `diffpriv
    protect` --out folder holds one folder per photo), sorted by name."""
    found = set()
    for path in paths:
        if path.is_dir():
            found.update(p for p in path.rglob(f"*{KEY_SUFFIX}") if p.is_file())
        elif path.is_file():
            found.add(path)
        else:
            raise FileNotFoundError(f"no such key file or folder: {path}")
    return sorted(found, key=lambda p: (p.name, str(p)))


def key_cases(keys: list[Path], originals: list[Case]) -> tuple[list[KeyCase], dict[str, str]]:
    """Each key with the original it was made from (by name: ``alice_00001.dpkey.safetensors``
    and ``group_face2_00001...`` belong to ``alice`` and ``group``), and why other keys are
    left out. A per-face key's original is its face crop, cut from the photo where the key
    says (the key recovers the crop)."""
    by_stem = {c.stem: c for c in originals}
    paired, skipped = [], {}
    for key in keys:
        stem = original_stem(key_stem(key), set(by_stem))
        if stem is None:
            skipped[key.name] = "no original named like it"
            continue
        try:
            original = original_for(key, by_stem[stem].original)
        except ValueError as exc:
            skipped[key.name] = str(exc)
            continue
        paired.append((key, Case(key_stem(key), original, source=by_stem[stem].source)))
    if len({c.stem for _, c in paired}) != len(paired):
        raise ValueError("two key files share a name: give the keys of one protect run")
    if len(paired) < MIN_KEYS:
        raise ValueError(f"the wrong-key experiment needs the keys of at least {MIN_KEYS} photos (three for "
                         f"'both wrong'), found {len(paired)} with an original: "
                         + (", ".join(f"{k}: {why}" for k, why in skipped.items()) or "none given"))
    n = len(paired)
    return [KeyCase(key, case, (paired[(i + 1) % n][0], paired[(i + 2) % n][0]))
            for i, (key, case) in enumerate(paired)], skipped


def original_for(key: Path, photo: np.ndarray) -> np.ndarray:
    """What the key recovers of ``photo``: the photo, or for a per-face key its face crop."""
    meta = read_public_metadata(key)
    if CROP_META not in meta:
        return photo
    import torch

    from diffpriv_core.faces.crop import FaceCrop, crop_faces

    crop = FaceCrop.from_json(meta[CROP_META])
    if tuple(crop.source_size) != photo.shape[:2]:
        raise ValueError(f"its face was cut from a {crop.source_size[1]} x {crop.source_size[0]} photo, the "
                         f"original is {photo.shape[1]} x {photo.shape[0]}")
    pixels = torch.from_numpy(np.array(photo)).float().div(255)[None]
    crop = FaceCrop(0, crop.face_index, crop.source_size, crop.box, crop.size, crop.face_box)
    return crop_faces(pixels, [crop])[0].mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


def experiment_graph(template: dict, key_names: tuple[str, str, str], variants: list[Variant],
                     folder: str = graphs.OUTPUT_PREFIX) -> dict:
    """From a recover workflow (its checkpoint and VAE): the three keys loaded (opened keys:
    no passphrase), and per variant the Wrong-Key Experiment, VAE Decode, Crop to Original
    Size (the size of the photo whose key-I it is) and Save Image, in ``folder`` (the job's),
    labelled with the variant's name."""
    (recover,) = [node for node in template.values() if node.get("class_type") == "DiffPrivacyRecover"] or [None]
    decodes = graphs.nodes_of(template, "VAEDecode")
    loaders = graphs.nodes_of(template, "DiffPrivacyLoadKey")
    if recover is None or not decodes or not loaders:
        raise ValueError("the wrong-key experiment takes the checkpoint and VAE of a recover workflow "
                         "(Load Privacy Key -> Recover -> VAE Decode): the workflow lacks one of them")
    model, vae = recover["inputs"]["model"], decodes[0]["inputs"]["vae"]
    graph = {i: copy.deepcopy(template[i]) for i in graphs.ancestors(template, model[0]) | graphs.ancestors(
        template, vae[0])}
    for index, name in enumerate(key_names):
        graph[f"key{index}"] = {"class_type": "DiffPrivacyLoadKey", "inputs": dict(
            loaders[0]["inputs"], key_name=name, passphrase="")}
    for v in variants:
        key_e = 0 if v.key_e is None else v.key_e
        graph[f"{v.name}_keys"] = {"class_type": EXPERIMENT_NODE, "inputs": {
            "model": model, "key_i": [f"key{v.key_i}", 1], "key_e": [f"key{key_e}", 0],
            "unconditional": v.key_e is None}}
        graph[f"{v.name}_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{v.name}_keys", 0],
                                                                         "vae": vae}}
        graph[f"{v.name}_crop"] = {"class_type": "DiffPrivacyCropToOriginalSize", "inputs": {
            "image": [f"{v.name}_decode", 0], "key_e": [f"key{v.key_i}", 0]}}
        graph[f"{v.name}_save"] = {"class_type": "SaveImage", "inputs": {"images": [f"{v.name}_crop", 0],
                                                                         "filename_prefix": f"{folder}/{v.name}"}}
    return graph


def run_experiment(args: argparse.Namespace, cases: list[KeyCase], out: Path) -> tuple[dict[str, str], list[str]]:
    """Every key's variants through ComfyUI (``args``: the eval command's server options),
    their pictures in ``out``/<key>/ and its summary.json; a rerun does only what is missing.
    As `diffpriv recover` does, each key is opened here and only the opened key goes to the
    server: the embedded ComfyUI, or one named with --trust-server. Returns the keys whose
    run failed, with why, and what could not be removed from the servers afterwards."""
    from diffpriv_client import cli
    from diffpriv_client.batch import Job, run_batch
    from diffpriv_client.servers import PROMPT_TIMEOUT_S
    from diffpriv_client.summary import Summary
    from diffpriv_core import key_crypto
    from diffpriv_core.key_format import KeyFileError

    command = argparse.Namespace(command="recover", photo=None, workflow=args.workflow, server=[],
                                 trust_server=args.trust_server, demo_weights=args.demo_weights, models=args.models,
                                 base=None, steps=None, max_in_flight=8, keep_on_server=False,
                                 prompt_timeout=PROMPT_TIMEOUT_S)
    template = cli.load_template(command)
    passphrase = cli.read_passphrase(args.passphrase_env)
    identity = ""
    if args.identity is not None:
        identity, passphrase = str(key_crypto.read_identity_file(args.identity, passphrase)), ""
    secrets = cli.KeySecrets(passphrase, identity)
    summary = Summary(out, "eval --wrong-keys")
    todo = [c for c in cases if not summary.is_done(c.case.stem)]

    def build(case: KeyCase, session) -> dict:
        uploaded = {}
        for path in dict.fromkeys(case.files()):
            try:
                uploaded[path] = session.upload_key(secrets.opened(path.read_bytes()))
            except KeyFileError as exc:
                raise KeyFileError(f"{path.name}: {exc}") from None
        names = tuple(uploaded[path] for path in case.files())
        return experiment_graph(template, names, case.variants(), session.folder)

    jobs = [Job(c.case.stem, c.key, lambda session, c=c: build(c, session)) for c in todo]
    with cli.connect(command, needed=bool(jobs)) as conn:
        cli.preflight_models(conn, template, command)
        not_removed = run_batch(jobs, conn.servers, summary, cli.cleanup_of(command))
    failed = {name: entry.get("error") or "failed" for name, entry in summary.results.items()
              if entry["status"] == "failed"}
    load_variants(cases, summary)
    return failed, not_removed


def load_variants(cases: list[KeyCase], summary) -> None:
    """Each case's pictures from its summary entry, by the variant label in their names, at the
    original's size."""
    pattern = re.compile(r"(?P<label>.+)_\d{5}_\.\w+")
    for kc in cases:
        entry = summary.results.get(kc.case.stem)
        if entry is None or entry["status"] not in ("ok", "skipped"):
            continue
        for rel in entry["outputs"]:
            match = pattern.fullmatch(Path(rel).name)
            if match and match["label"] in {v.name for v in VARIANTS}:
                kc.case.variants[match["label"]] = load_at_size(summary.out_dir / rel, kc.case.original.shape[:2],
                                                                kc.case)
