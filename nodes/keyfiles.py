"""Save Privacy Key / Load Privacy Key: key files in models/diffprivacy_keys or output/."""
from __future__ import annotations

import dataclasses
import os

import folder_paths
from comfy_api.v0_0_2 import io

from diffpriv_core.faces.binding import bind
from diffpriv_core.faces.crop import MSI, UNCONDITIONAL, FaceCrop
from diffpriv_core.key_crypto import check_recipient
from diffpriv_core.key_format import CROP_META
from diffpriv_core.keys import load_key, safe_join, save_next_key

from .inputs import per_image
from .types import FaceCrops, KeyE, KeyI

KEYS_FOLDER = "diffprivacy_keys"
# Merge into (never overwrite) the folder list, so extra_model_paths.yaml entries stay.
folder_paths.add_model_folder_path(KEYS_FOLDER, os.path.join(folder_paths.models_dir, KEYS_FOLDER), is_default=True)
# Only .safetensors files are offered: a partial file an interrupted save left is never listed.
folder_paths.folder_names_and_paths[KEYS_FOLDER][1].add(".safetensors")

PASSPHRASE_TIP = ("optional; encrypts the key (AES-256-GCM, scrypt). Note: ComfyUI stores node inputs in "
                  "saved workflows, PNG metadata and its history, which every client of the server can read: on a "
                  "shared server use a recipient instead")
OPEN_PASSPHRASE_TIP = ("the passphrase the key was saved with; empty for a key saved without one. The "
                       "same note: ComfyUI keeps node inputs where every client of the server can read them")
RECIPIENT_TIP = ("optional; an age recipient (age1..., printed by `diffpriv keygen`): the key is sealed to it, and "
                 "only its identity file opens it, so the server never holds anything that opens the key")


def keys_dir() -> str:
    return folder_paths.get_folder_paths(KEYS_FOLDER)[0]


class SavePrivacyKey(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacySaveKey",
            display_name="Save Privacy Key (Diff-Privacy)",
            category="Diff-Privacy/keys",
            description="Writes one key file per image (key-E, key-I and metadata; no pickle), owner-only.",
            inputs=[
                KeyE.Input("key_e", tooltip="from MSI Inversion: one key file per image"),
                io.String.Input("filename_prefix", default="diffprivacy/key",
                                tooltip="the files' names, in the chosen folder (sub-folders allowed); a "
                                        "number is added, no file is ever replaced"),
                io.Combo.Input("folder", options=["keys", "output"], default="keys",
                               tooltip="keys: models/diffprivacy_keys (not served over HTTP); output: the "
                                       "output folder, downloadable through /view like images"),
                io.String.Input("passphrase", default="", tooltip=PASSPHRASE_TIP),
                KeyI.Input("key_i", optional=True, tooltip="from DDIM Inversion Key; without it the file holds key-E only"),
                FaceCrops.Input("crop_info", optional=True,
                                tooltip="from Face Crop: each key records its face's place in the photo, so "
                                        "Recover + Face Paste can put that face back; files are named _face<N>"),
                io.String.Input("recipient", default="", optional=True, tooltip=RECIPIENT_TIP),
                io.Image.Input("protected", optional=True,
                               tooltip="with crop_info: the protected pictures (Face Paste's image output); each "
                                       "face's key records a digest of its face's region in them, so the face is "
                                       "recovered only into these pictures"),
            ],
            outputs=[io.String.Output(display_name="paths", tooltip="the key files written, one per line")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, key_e, filename_prefix, folder, passphrase, key_i=None, crop_info=None,
                recipient="", protected=None) -> io.NodeOutput:
        count = len(key_i) if key_i else len(key_e)
        if passphrase and recipient:
            raise ValueError("Save Privacy Key: give a passphrase or a recipient, not both")
        if recipient:
            check_recipient(recipient.strip())
        keys_e = per_image(key_e, count, "Save Privacy Key", "key_e", "key-E", "key_i")
        if crop_info is not None and len(crop_info) != count:
            raise ValueError(f"{len(crop_info)} face crops for {count} keys: connect the Face Crop whose crops "
                             "made these keys")
        if crop_info is not None and protected is not None:
            crop_info = bind(crop_info, protected)
        root = folder_paths.get_output_directory() if folder == "output" else keys_dir()
        written, records = [], []
        for b in range(count):
            crop = recorded_crop(crop_info[b], keys_e[b]) if crop_info is not None else None
            path = save_next_key(root, face_key_prefix(filename_prefix, crop, crop_info), keys_e[b],
                                 key_i[b] if key_i else None, passphrase or None,
                                 extra={CROP_META: crop.to_json()} if crop is not None else None,
                                 recipient=recipient.strip() or None)
            written.append(str(path))
            # Against the folder's real path: a linked models/ folder must not give '../..' records.
            rel = os.path.relpath(path, os.path.realpath(root))
            records.append({"filename": os.path.basename(rel), "subfolder": os.path.dirname(rel),
                            "type": "output" if folder == "output" else KEYS_FOLDER})
        return io.NodeOutput("\n".join(written), ui={"diffprivacy_keys": records})


def recorded_crop(crop: FaceCrop, key_e) -> FaceCrop:
    """The crop as the key records it, with the protection the face really got: its key-E
    says whether MSI trained it (a Face Crop's plan is not enough: a graph may not have
    wired it into MSI Inversion)."""
    protection = UNCONDITIONAL if key_e.meta.get("msi_variant") == UNCONDITIONAL else MSI
    return dataclasses.replace(crop, protection=protection)


def face_key_prefix(prefix: str, crop: FaceCrop | None, crops: list[FaceCrop] | None) -> str:
    """``prefix``, or ``prefix_face<N>`` (``prefix_image<B>_face<N>`` when the crops come from
    several photos), so each face's key is found by its face index."""
    if crop is None:
        return prefix
    if len({c.image_index for c in crops}) > 1:
        return f"{prefix}_image{crop.image_index}_face{crop.face_index}"
    return f"{prefix}_face{crop.face_index}"


class LoadPrivacyKey(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyLoadKey",
            display_name="Load Privacy Key (Diff-Privacy)",
            category="Diff-Privacy/keys",
            description="Reads a key file from models/diffprivacy_keys, verifying integrity (and decrypting).",
            inputs=[
                io.Combo.Input("key_name", options=folder_paths.get_filename_list(KEYS_FOLDER),
                               tooltip="a key file in models/diffprivacy_keys"),
                io.String.Input("passphrase", default="", tooltip=OPEN_PASSPHRASE_TIP),
            ],
            outputs=[KeyE.Output(display_name="key_e", tooltip="the file's key-E"),
                     KeyI.Output(display_name="key_i", tooltip="the file's key-I (empty if it holds key-E only)"),
                     FaceCrops.Output(display_name="crop_info",
                                      tooltip="where the key's face sits in its photo, for Face Paste (empty for "
                                              "a key made from a whole image)")],
        )

    @classmethod
    def execute(cls, key_name, passphrase) -> io.NodeOutput:
        folders = folder_paths.get_folder_paths(KEYS_FOLDER)
        for folder in folders:
            path = safe_join(folder, key_name)
            if path.is_file():
                key_e, key_i, meta = load_key(path, passphrase or None)
                crops = [FaceCrop.from_json(meta[CROP_META])] if CROP_META in meta else []
                return io.NodeOutput([key_e], [key_i] if key_i is not None else [], crops)
        raise FileNotFoundError(f"key file {key_name!r} not found in {', '.join(folders)}")
