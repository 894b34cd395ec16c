"""key-I (DDIM inversion of the original under key-E) and Stage III, recovery."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from diffpriv_core.passes import PassCounter
from diffpriv_core.recovery import (MODES, check_checkpoint, check_keys, make_key_i, recover, recovery_steps, retrace,
                                   unconditional_key_e)
from diffpriv_core.tasks import TASKS

from .adapters import ComfyEpsModel
from .host import Progress
from .inputs import per_image, sd1_model, sd_latents
from .types import KeyE, KeyI, batch_size_input

KEY_I = TASKS["anonymize"].key_i  # the defaults; the hide workflows invert on their 100-step grid
MODE_TIPS = {"bdia": "exact (ours): one UNet call per step, recovery retraces the inversion to rounding "
                     "(limited by the VAE)",
             "fixed_point": "near-exact: refines each DDIM inversion step (1 + refine_iterations calls per step)",
             "ddim": "plain DDIM inversion, as in the paper (approximate)"}
# Latents per UNet call: forward passes only, no gradient, so far more fit than in MSI's
# training or the guided sampler; as many as the sampler's default all the same.
DEFAULT_BATCH = 16


class DDIMInversionKey(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyDDIMInversionKey",
            display_name="DDIM Inversion Key (Diff-Privacy)",
            category="Diff-Privacy/keys",
            description="key-I: inverts the ORIGINAL image's latent under key-E. Keep it with key-E; "
                        "together they recover the original.",
            inputs=[
                io.Model.Input("model", tooltip="the SD 1.x checkpoint key-E was made with"),
                io.Latent.Input("latent", tooltip="the original image, VAE-encoded"),
                KeyE.Input("key_e", tooltip="the image's key-E (from MSI Inversion)"),
                io.Int.Input("steps", default=KEY_I.steps, min=1, max=500,
                             tooltip="DDIM inversion steps (bdia: at least 2); recovery runs on the same grid"),
                io.Combo.Input("mode", options=list(MODES), default=KEY_I.mode,
                               tooltip="; ".join(f"{m}: {tip}" for m, tip in MODE_TIPS.items())),
                io.Int.Input("refine_iterations", default=KEY_I.refine, min=1, max=50,
                             tooltip="fixed_point mode only (bdia and ddim ignore it): refinements per step "
                                     "(each costs one UNet call)"),
                batch_size_input(DEFAULT_BATCH, 1024, "the images invert together, one call a step for up to this "
                                 "many", "The keys do"),
            ],
            outputs=[KeyI.Output(display_name="key_i", tooltip="one key-I per image: the original latent inverted under "
                                                                   "its key-E")],
        )

    @classmethod
    def execute(cls, model, latent, key_e, steps, mode, refine_iterations, batch_size=DEFAULT_BATCH) -> io.NodeOutput:
        node = "DDIM Inversion Key"
        samples = sd_latents(latent, node)
        sd1_model(model, node)
        keys_e = per_image(key_e, samples.shape[0], node, "key_e", "key-E", "latent")
        eps = ComfyEpsModel(model)
        for k in keys_e:
            check_checkpoint(k.meta, eps.fingerprint, "key-E")
        meta = {"checkpoint": eps.fingerprint, "latent_size": f"{samples.shape[-1]}x{samples.shape[-2]}"}
        counter = PassCounter()
        keys_i = make_key_i(counter.eps(eps), eps.to_z(samples), keys_e, steps, mode, refine_iterations, meta,
                            callback=Progress(steps).step, batch_size=batch_size)
        return io.NodeOutput(keys_i, ui={"passes": counter.report("DDIM Inversion Key", samples.shape[0])})


class Recover(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyRecover",
            display_name="Recover (Diff-Privacy)",
            category="Diff-Privacy/keys",
            description="Stage III: deterministic sampling from key-I with key-E (BDIA for a bdia key-I, DDIM "
                        "otherwise) gives the original latent back. A key-E that key-I was not made from is refused.",
            inputs=[io.Model.Input("model", tooltip="the SD 1.x checkpoint the keys were made with"),
                    KeyI.Input("key_i", tooltip="from Load Privacy Key (or DDIM Inversion Key)"),
                    KeyE.Input("key_e", tooltip="the key-E of the same key file"),
                    batch_size_input(DEFAULT_BATCH, 1024, "the key-Is recover together, one call a step for up to "
                                     "this many", "The latents do")],
            outputs=[io.Latent.Output(display_name="latent", tooltip="the original latent, recovered: VAE Decode it")],
        )

    @classmethod
    def execute(cls, model, key_i, key_e, batch_size=DEFAULT_BATCH) -> io.NodeOutput:
        if not key_i:
            raise ValueError("Recover got no key-I: the key file holds only key-E (it was saved before "
                             "DDIM Inversion Key); save key-E and key-I together to recover")
        sd1_model(model, "Recover")
        keys_e = per_image(key_e, len(key_i), "Recover", "key_e", "key-E", "key_i")
        eps = ComfyEpsModel(model)
        for k in keys_e:
            check_checkpoint(k.meta, eps.fingerprint, "key-E")
        counter = PassCounter()
        z = recover(counter.eps(eps), key_i, keys_e, eps.fingerprint,
                    callback=Progress(recovery_steps(key_i[0])).step, batch_size=batch_size)
        return io.NodeOutput({"samples": eps.to_samples(z)}, ui={"passes": counter.report("Recover", len(key_i))})


class WrongKeyExperiment(io.ComfyNode):
    """The paper's Fig. 7: what a key-I and a key-E that do not belong together give."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffPrivacyWrongKeyExperiment",
            display_name="Wrong-Key Experiment (Diff-Privacy, evaluation)",
            category="Diff-Privacy/evaluation",
            description="For evaluation only (the paper's Fig. 7, `diffpriv eval --wrong-keys`): runs recovery's "
                        "DDIM from key-I under the key-E given, whether or not they belong together, to show that "
                        "only the right pair brings the face back. Writes no key. To recover a photo use Recover, "
                        "which refuses keys that do not belong together.",
            inputs=[
                io.Model.Input("model", tooltip="the checkpoint both keys were made with"),
                KeyI.Input("key_i", tooltip="one key-I: the photo's own, or another photo's"),
                KeyE.Input("key_e", tooltip="one key-E: the photo's own, or another photo's"),
                io.Boolean.Input("unconditional", default=False,
                                 tooltip="condition every step on key-E's unconditional embedding (the empty "
                                         "prompt) instead of its stages: UC as key-E"),
            ],
            outputs=[io.Latent.Output(display_name="latent",
                                      tooltip="what the two keys give; the photo only when they belong together")],
        )

    @classmethod
    def execute(cls, model, key_i, key_e, unconditional) -> io.NodeOutput:
        node = "Wrong-Key Experiment"
        if len(key_i) != 1 or len(key_e) != 1:
            raise ValueError(f"{node} takes one key-I and one key-E (from Load Privacy Key), got {len(key_i)} and "
                             f"{len(key_e)}")
        sd1_model(model, node)
        eps = ComfyEpsModel(model)
        check_checkpoint(key_e[0].meta, eps.fingerprint, "key-E")  # both keys made with this checkpoint
        check_keys(key_i, eps.fingerprint)
        keys_e = [unconditional_key_e(key_e[0]) if unconditional else key_e[0]]
        counter = PassCounter()
        z = retrace(counter.eps(eps), key_i, keys_e, callback=Progress(recovery_steps(key_i[0])).step)
        return io.NodeOutput({"samples": eps.to_samples(z)}, ui={"passes": counter.report(node, 1)})
