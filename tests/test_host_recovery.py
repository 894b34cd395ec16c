"""key-I, recovery and key files in the real host."""
from __future__ import annotations


import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_bytes

from diffpriv_client.comfy_http import PromptFailed
from diffpriv_client.preflight import loader_options
from diffpriv_core import ddim
from diffpriv_core.keys import save_key
from diffpriv_core.recovery import conditioned_eps
from diffpriv_core.schedule import ddim_grid
from diffpriv_testmodels.comfy_models import CHECKPOINT
from diffpriv_testmodels.inprocess import pack_module
from key_helpers import key_i_for, random_key_e  # noqa: F401  (random_key_e: shared with other host tests)

pytestmark = pytest.mark.host
# Random-weight UNets are far less smooth than trained ones, so plain DDIM inversion
# drifts badly on them; BDIA's recovery retraces its inversion to rounding on this grid.
STEPS = 50


@pytest.fixture(scope="module")
def keys_dir(comfy_host):
    path = comfy_host.keys
    for seed in (1, 2):
        save_key(path / f"test-e{seed}.dpkey.safetensors", random_key_e(seed))
    return path


@pytest.fixture(scope="module")
def images(comfy_host, astronaut):
    small = astronaut[::8, ::8].copy()  # 64 x 64
    other = astronaut[256::4, 256::4].copy()  # another 64 x 64 picture
    return comfy_host.upload(small, "rt-a.png"), comfy_host.upload(other, "rt-b.png")


def encode(graph: dict, node: str, image: str) -> str:
    graph[f"{node}i"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    graph[node] = {"class_type": "VAEEncode", "inputs": {"pixels": [f"{node}i", 0], "vae": ["ckpt", 2]}}
    return node


def fetch_latent(host, result, node: str) -> torch.Tensor:
    (record,) = result.files(node, "latents")
    return load_safetensors(host.client.view(record))["latent_tensor"].float()


def base_graph() -> dict:
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dp-test-sd15.safetensors"}}}


def add(graph: dict, node: str, class_type: str, **inputs) -> list:
    graph[node] = {"class_type": class_type, "inputs": inputs}
    return [node, 0]


def invert(graph, node, latent, key_e, mode="bdia", steps=STEPS, refine=1):
    return add(graph, node, "DiffPrivacyDDIMInversionKey", model=["ckpt", 0], latent=[latent, 0], key_e=key_e,
               steps=steps, mode=mode, refine_iterations=refine)


def recover(graph, node, key_i, key_e):
    out = add(graph, node, "DiffPrivacyRecover", model=["ckpt", 0], key_i=key_i, key_e=key_e)
    add(graph, f"{node}save", "SaveLatent", samples=out, filename_prefix=f"latents/{node}")
    return f"{node}save"


def test_invert_recover_with_right_and_wrong_keys(comfy_host, keys_dir, images):
    g = base_graph()
    encode(g, "a", images[0])
    encode(g, "b", images[1])
    add(g, "asave", "SaveLatent", samples=["a", 0], filename_prefix="latents/original")
    key_e = ["k1", 0]
    add(g, "k1", "DiffPrivacyLoadKey", key_name="test-e1.dpkey.safetensors", passphrase="")
    add(g, "k2", "DiffPrivacyLoadKey", key_name="test-e2.dpkey.safetensors", passphrase="")
    key_i = invert(g, "inv", "a", key_e)  # the default mode, bdia
    plain_i = invert(g, "invd", "a", key_e, mode="ddim")
    other_i = invert(g, "invb", "b", key_e)
    # The older mode still makes keys that recover by plain DDIM (10 steps, 4 refinements:
    # 50 UNet calls, near-exact only where the refinement converges).
    fixed_i = invert(g, "invf", "a", key_e, mode="fixed_point", steps=10, refine=4)
    runs = {"right": recover(g, "r_right", key_i, key_e), "plain": recover(g, "r_plain", plain_i, key_e),
            "wrong_i": recover(g, "r_wrong_i", other_i, key_e), "fixed": recover(g, "r_fixed", fixed_i, key_e)}
    add(g, "wrong_e", "DiffPrivacyWrongKeyExperiment", model=["ckpt", 0], key_i=key_i, key_e=["k2", 0],
        unconditional=False)
    add(g, "wrong_esave", "SaveLatent", samples=["wrong_e", 0], filename_prefix="latents/wrong_e")
    runs["wrong_e"] = "wrong_esave"
    add(g, "save", "DiffPrivacySaveKey", key_e=key_e, key_i=key_i, filename_prefix="rt/astronaut",
        folder="keys", passphrase="")
    add(g, "savepw", "DiffPrivacySaveKey", key_e=key_e, key_i=key_i, filename_prefix="rt/astronaut-pw",
        folder="output", passphrase="s3cret")
    result = comfy_host.client.run(g)

    original = fetch_latent(comfy_host, result, "asave")
    errors = {name: (fetch_latent(comfy_host, result, node) - original).pow(2).mean().item()
              for name, node in runs.items()}
    scale = original.pow(2).mean().item()
    # Retraced to float rounding (amplified along 50 steps of a rough random UNet: measured
    # 7e-6 of the latent's mean square; plain DDIM inversion 240, fixed_point 10 x 4 6).
    assert errors["right"] < 1e-4 * scale, errors
    assert errors["right"] < errors["fixed"] / 100 and errors["right"] < errors["plain"] / 100, errors
    assert errors["wrong_i"] > 1e-2 * scale and errors["wrong_e"] > 1e-2 * scale, errors
    # One UNet call per step to make the key, one fewer to recover it; a fixed_point key
    # recovers by plain DDIM, one call per step.
    passes = {node: result.outputs[node]["passes"][0]["passes"]["unet_forward"] for node in ("inv", "r_right", "r_fixed")}
    assert passes == {"inv": STEPS, "r_right": STEPS - 1, "r_fixed": 10}, passes

    (plain_record,) = result.files("save", "diffprivacy_keys")
    assert plain_record["filename"].endswith(".dpkey.safetensors") and plain_record["subfolder"] == "rt"
    (pw_record,) = result.files("savepw", "diffprivacy_keys")
    encrypted = comfy_host.client.view(pw_record)
    assert b"s3cret" not in encrypted and b'"dtype":"F32"' not in encrypted  # only the U8 ciphertext shows

    # The encrypted key, downloaded and put in the keys folder, recovers the same latent
    # bit for bit, in a later prompt.
    (keys_dir / "rt" / "downloaded.dpkey.safetensors").write_bytes(encrypted)
    g2 = base_graph()
    add(g2, "k", "DiffPrivacyLoadKey", key_name="rt/downloaded.dpkey.safetensors", passphrase="s3cret")
    node = recover(g2, "again", ["k", 1], ["k", 0])
    again = fetch_latent(comfy_host, comfy_host.client.run(g2), node)
    assert torch.equal(again, fetch_latent(comfy_host, result, runs["right"]))

    g3 = base_graph()
    add(g3, "k", "DiffPrivacyLoadKey", key_name="rt/downloaded.dpkey.safetensors", passphrase="wrong")
    recover(g3, "bad", ["k", 1], ["k", 0])
    with pytest.raises(PromptFailed, match="wrong passphrase"):
        comfy_host.client.run(g3)

    # Another photo's key-E with this key-I is refused, not run into a wrong picture.
    g4 = base_graph()
    add(g4, "k", "DiffPrivacyLoadKey", key_name=f"rt/{plain_record['filename']}", passphrase="")
    add(g4, "k2", "DiffPrivacyLoadKey", key_name="test-e2.dpkey.safetensors", passphrase="")
    recover(g4, "mixed", ["k", 1], ["k2", 0])
    with pytest.raises(PromptFailed, match="do not belong together"):
        comfy_host.client.run(g4)


def bad_key_graph(name: str) -> dict:
    g = base_graph()
    add(g, "k", "DiffPrivacyLoadKey", key_name=name, passphrase="")
    recover(g, "r", ["k", 1], ["k", 0])
    return g


@pytest.mark.parametrize("case, message", [
    ("tampered", "integrity check failed"),
    ("other_checkpoint", "made with another checkpoint"),
    ("other_grid", "another timestep grid"),
    ("key_e_only", "holds only key-E"),
    ("not_a_key", "not a Diff-Privacy key file"),
])
def test_bad_keys_fail_clearly_and_the_server_stays_up(comfy_host, keys_dir, case, message):
    key_e = random_key_e(1)
    key_i = key_i_for(key_e, STEPS)
    path = keys_dir / f"bad-{case}.dpkey.safetensors"
    if case == "tampered":
        save_key(path, key_e, key_i)
        data = bytearray(path.read_bytes())
        data[-7] ^= 0x40
        path.write_bytes(bytes(data))
    elif case == "other_checkpoint":
        key_i.meta["checkpoint"] = "0123456789abcdef"
        save_key(path, key_e, key_i)
    elif case == "other_grid":
        key_i.meta["grid"] = "999,500,1"
        save_key(path, key_e, key_i)
    elif case == "key_e_only":
        save_key(path, key_e)
    else:
        path.write_bytes(save_bytes({"lora_unet_down.weight": torch.zeros(4, 4)}))  # a safetensors, not a key
    with pytest.raises(PromptFailed, match=message):
        comfy_host.client.run(bad_key_graph(path.name))
    assert comfy_host.client.is_up()


def test_path_traversal_names_are_refused(comfy_host, keys_dir):
    with pytest.raises(Exception):
        comfy_host.client.run(bad_key_graph("../checkpoints/dp-test-sd15.safetensors"))
    g = base_graph()
    add(g, "k", "DiffPrivacyLoadKey", key_name="test-e1.dpkey.safetensors", passphrase="")
    add(g, "s", "DiffPrivacySaveKey", key_e=["k", 0], filename_prefix="../../escape", folder="keys", passphrase="")
    with pytest.raises(PromptFailed, match="invalid key file name"):
        comfy_host.client.run(g)
    assert not (comfy_host.base / "escape_00001.dpkey.safetensors").exists()


def test_partial_files_are_never_offered_as_keys(comfy_host, keys_dir):
    """A partial file an interrupted save left behind is not listed by Load Privacy Key."""
    partial = keys_dir / ".crashed.dpkey.safetensors.0a1b2c.partial"
    partial.write_bytes(b"half a key")
    options = loader_options(comfy_host.client, "DiffPrivacyLoadKey", "key_name")
    assert "test-e1.dpkey.safetensors" in options and not any(o.endswith(".partial") for o in options), options


def test_stock_sampler_with_the_scheduler_matches_the_core_loop(comfy_inproc, test_models):
    """SamplerCustom's ddim with the Embedding Scheduler's CONDITIONING == our loop with
    C_t chosen by the core (same noise, same grid, S_ns 0.6, tau 0.4)."""
    scheduler = pack_module("nodes.scheduler")
    adapters = pack_module("nodes.adapters")
    model = comfy_inproc.sd.load_checkpoint_guess_config(str(test_models / CHECKPOINT))[0]
    key_e = random_key_e(3)
    g = torch.Generator().manual_seed(0)
    latent, noise = torch.randn(1, 4, 8, 8, generator=g) * 4, torch.randn(1, 4, 8, 8, generator=g)
    grid = ddim_grid(20).tail(0.6)
    cond = scheduler.scheduled_conditioning([key_e], 0.4)
    sigmas = comfy_inproc.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "ddim_uniform", 20)
    stock = comfy_inproc.sample.sample_custom(model, noise, 1.0, comfy_inproc.samplers.sampler_object("ddim"),
                                              sigmas[-(grid.steps + 1):], cond, cond, latent, seed=0,
                                              disable_pbar=True)
    eps = adapters.ComfyEpsModel(model)
    with torch.no_grad():
        z = ddim.sample(conditioned_eps(eps, [key_e], tau=0.4),
                        ddim.add_noise(eps.to_z(latent), noise, grid.alphas[0]), grid)
    ours = eps.to_samples(z)
    assert torch.allclose(ours, stock.float(), atol=1e-3 * stock.abs().max().item()), (ours - stock).abs().max()
    # And the schedule matters: the same loop with C^{t//100} everywhere (tau 0) differs.
    with torch.no_grad():
        z_no_uc = ddim.sample(conditioned_eps(eps, [key_e]), ddim.add_noise(eps.to_z(latent), noise,
                                                                                          grid.alphas[0]), grid)
    assert not torch.allclose(eps.to_samples(z_no_uc), stock.float(), atol=1e-3 * stock.abs().max().item())


def test_key_i_and_recovery_give_each_image_of_a_batch_what_it_gets_alone(comfy_inproc, test_models):
    """Three latents, each with its own key-E, inverted and recovered one per UNet call
    (batch_size 1) and all in one call (0): the same key-Is and recovered latents (float
    rounding aside), in three times the calls against the same passes."""
    recovery = pack_module("nodes.recovery")
    model = comfy_inproc.sd.load_checkpoint_guess_config(str(test_models / CHECKPOINT))[0]
    keys_e = [random_key_e(s) for s in (1, 2, 3)]
    latent = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5)) * 4}
    steps = 20  # on a 6-step grid this random-weight UNet amplifies BDIA's rounding to a 40% error

    def run(batch_size):
        made = recovery.DDIMInversionKey.execute(model, latent, keys_e, steps, "bdia", 1, batch_size=batch_size)
        back = recovery.Recover.execute(model, made.args[0], keys_e, batch_size=batch_size)
        return made.args[0], back.args[0]["samples"], made.ui["passes"], back.ui["passes"]

    alone, together = run(1), run(0)
    for one, all_ in zip(alone[0], together[0], strict=True):
        assert torch.allclose(one.latent, all_.latent, atol=1e-4 * float(one.latent.abs().max()))
        assert torch.allclose(one.below, all_.below, atol=1e-4 * float(one.below.abs().max()))
    assert torch.allclose(alone[1], together[1], atol=1e-4 * float(alone[1].abs().max()))
    assert torch.allclose(together[1], latent["samples"], atol=1e-3 * float(latent["samples"].abs().max()))
    for report_alone, report_together, calls in ((alone[2], together[2], steps), (alone[3], together[3], steps - 1)):
        assert [e["passes"] for e in report_alone] == [e["passes"] for e in report_together]
        assert report_together[0]["calls"]["unet_forward"] == calls
        assert report_alone[0]["calls"]["unet_forward"] == 3 * calls
