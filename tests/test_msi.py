"""Stage I (MSI) without a host: the module, the trainer, key-E, and the diffusers adapters
on tiny random models."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from diffpriv_core.clip_features import CLIP_MEAN, CLIP_STD, check_vit_l14, pick_blocks, to_clip_pixels
from diffpriv_core.key_types import KeyE
from diffpriv_core import msi_train
from diffpriv_core.msi import MSI, MSIShape, make_key_e
from diffpriv_core.msi_train import (PRESETS, TimestepSampler, check_images, held_out_loss, lr_factor, preset,
                                     train_msi)
from diffpriv_core.passes import PassCounter
from diffpriv_core.schedule import STAGES
from diffpriv_testmodels import tiny_diffusers, toy_host


def image(seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))


def features(shape: MSIShape, seed: int = 0, tokens: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, tokens, shape.feature_dim, generator=g) for _ in range(5)]


@pytest.fixture(scope="module")
def tiny():
    return tiny_diffusers.tiny_components()


# --- the module ---------------------------------------------------------------------------

def test_msi_has_the_reference_codes_parameter_count():
    """10,626,816: the reference code's module at its widths (CLIP ViT-L/14's 1024 in, SD 1.x's
    768 out, 8 heads of 64): about 10.6 M."""
    assert sum(p.numel() for p in MSI().parameters()) == 10_626_816


def test_stage_i_reads_clip_layer_i_over_2():
    msi = MSI(toy_host.SHAPE).eval()
    stages = torch.arange(STAGES)
    base = features(toy_host.SHAPE)
    before = msi(base, stages)
    for layer in range(5):
        changed = list(base)
        changed[layer] = changed[layer] + 1.0
        moved = (msi(changed, stages) - before).abs().amax(dim=1) > 1e-6
        assert moved.tolist() == [i // 2 == layer for i in range(STAGES)], layer


def test_one_embedding_ablation_reads_the_last_layer_only_and_ignores_the_stage():
    shape = MSIShape(feature_dim=24, token_dim=32, heads=2, head_dim=8, one_embedding=True)
    msi = MSI(shape).eval()
    assert msi.stage_embedding is None and len(msi.project) == 1
    base = features(shape)
    out = msi(base, torch.arange(STAGES))
    # Rows differ only by float rounding (batched kernels), never by a stage's embedding.
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    assert torch.equal(msi(base[:4] + [base[4] + 1], torch.arange(2)).ne(out[:2]).any(dim=1), torch.tensor([True, True]))
    assert torch.allclose(msi([f + 1 for f in base[:4]] + base[4:], torch.arange(2)), out[:2], atol=1e-6)


def test_msi_takes_five_hidden_states():
    with pytest.raises(ValueError, match="5 CLIP hidden states"):
        MSI(toy_host.SHAPE)(features(toy_host.SHAPE)[:4], torch.arange(2))


# --- key-E --------------------------------------------------------------------------------

def test_key_e_validates_its_tensors():
    KeyE(torch.zeros(10, 77, 768), torch.zeros(1, 77, 768), {"a": "b"})
    with pytest.raises(ValueError, match="10 stage embeddings"):
        KeyE(torch.zeros(9, 77, 768), torch.zeros(1, 77, 768))
    with pytest.raises(ValueError, match="UC"):
        KeyE(torch.zeros(10, 77, 768), torch.zeros(1, 76, 768))
    with pytest.raises(ValueError, match="float32"):
        KeyE(torch.zeros(10, 77, 768, dtype=torch.float16), torch.zeros(1, 77, 768))
    with pytest.raises(ValueError, match="str"):
        KeyE(torch.zeros(10, 77, 768), torch.zeros(1, 77, 768), {"steps": 5})


def test_key_e_holds_one_conditioning_per_stage_and_the_empty_prompt():
    host, nets = toy_host.toy_host()
    msi = MSI(toy_host.SHAPE)
    feats = nets.features(image())
    key = make_key_e(msi, feats, host.text, {"note": "x"})
    assert key.stages.shape == (STAGES, toy_host.TOKENS, toy_host.TOKEN_DIM) and key.uc.shape == (1, *key.stages.shape[1:])
    assert torch.equal(key.uc, nets.encode_empty())
    msi.eval()
    assert torch.allclose(key.condition(3), nets.encode_with_token(msi(feats, torch.tensor([3]))), atol=1e-6)
    assert msi.training is False and key.meta == {"note": "x"}


# --- the trainer --------------------------------------------------------------------------

def head_and_tail(losses: list[float], n: int) -> tuple[float, float]:
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_preset_lowers_the_loss(seed):
    host, _ = toy_host.toy_host()
    result = train_msi(image(seed), host, preset("fast", steps=40, seed=seed, shape=toy_host.SHAPE))
    first, last = head_and_tail(result.losses, 8)
    assert len(result.losses) == 40 and last < 0.5 * first


def test_faithful_preset_lowers_the_held_out_loss():
    # At batch 1 the per-step loss is too noisy to compare means; a fixed sample is not.
    host, _ = toy_host.toy_host()
    config = preset("faithful", steps=150, shape=toy_host.SHAPE)
    untrained = train_msi(image(), host, dataclasses.replace(config, steps=0)).msi
    trained = train_msi(image(), host, config).msi
    assert held_out_loss(trained, image(), host) < 0.8 * held_out_loss(untrained, image(), host)


def test_one_embedding_variant_trains_and_repeats_its_conditioning():
    host, _ = toy_host.toy_host()
    shape = dataclasses.replace(toy_host.SHAPE, one_embedding=True)
    result = train_msi(image(), host, preset("fast", steps=30, shape=shape))
    first, last = head_and_tail(result.losses, 6)
    assert last < first
    assert torch.allclose(result.key.stages, result.key.stages[:1].expand_as(result.key.stages))
    assert result.key.meta["msi_variant"] == "one_embedding"


def test_training_is_deterministic_for_a_seed():
    host, _ = toy_host.toy_host()
    runs = [train_msi(image(), host, preset("fast", steps=5, seed=s, shape=toy_host.SHAPE)) for s in (7, 7, 8)]
    assert runs[0].losses == runs[1].losses and torch.equal(runs[0].key.stages, runs[1].key.stages)
    assert not torch.equal(runs[0].key.stages, runs[2].key.stages)


def test_training_leaves_the_callers_rng_alone():
    host, _ = toy_host.toy_host()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_msi(image(), host, preset("fast", steps=2, shape=toy_host.SHAPE))
    assert torch.equal(torch.rand(3), expected)


def test_the_callback_sees_every_step_and_can_stop_training():
    host, _ = toy_host.toy_host()
    seen = []

    def callback(step, total, loss):
        seen.append((step, total))
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_msi(image(), host, preset("fast", steps=10, shape=toy_host.SHAPE), callback=callback)
    assert seen == [(1, 10), (2, 10), (3, 10)]


def test_reusing_encodings_changes_no_value():
    host, _ = toy_host.toy_host()
    config = preset("fast", steps=6, shape=toy_host.SHAPE)
    cached, fresh = (train_msi(image(), host, dataclasses.replace(config, reuse_encodings=r)) for r in (True, False))
    assert cached.losses == fresh.losses and torch.equal(cached.key.stages, fresh.key.stages)


@pytest.mark.parametrize("per_step", [1, 2, 3, 10])
def test_stratified_timesteps_cover_every_stage_once_per_round(per_step):
    g = torch.Generator().manual_seed(0)
    sample = TimestepSampler(preset("fast", timesteps_per_step=per_step), g)
    drawn = torch.cat([sample() for _ in range(30)])
    assert drawn.shape == (30 * per_step,) and drawn.min() >= 0 and drawn.max() <= 999
    rounds = (drawn // 100).view(-1, STAGES)  # every 10 consecutive timesteps: each stage once
    assert all(sorted(r.tolist()) == list(range(STAGES)) for r in rounds)
    assert len({tuple(r.tolist()) for r in rounds}) > 1  # in a shuffled order
    assert TimestepSampler(PRESETS["faithful"], g)().shape == (1,)


def test_learning_rate_schedule_warms_up_then_decays():
    config = preset("fast", steps=100, warmup_steps=10)
    factors = [lr_factor(config, s) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))
    assert factors[-1] == pytest.approx(config.min_lr_ratio, abs=0.01)
    assert all(lr_factor(PRESETS["faithful"], s) == 1.0 for s in (0, 100, 6000))


def test_presets_and_overrides():
    faithful = PRESETS["faithful"]
    assert (faithful.lr, faithful.steps, faithful.timesteps_per_step, faithful.mixed_precision) == (1e-4, 6100, 1, False)
    assert preset("fast", steps=None, lr=5e-4).lr == 5e-4 and preset("fast", steps=None).steps == PRESETS["fast"].steps
    with pytest.raises(ValueError, match="unknown MSI preset"):
        preset("slow")


@pytest.mark.parametrize("name", ["fast", "faithful"])
def test_presets_encode_each_flip_once(name):
    host, nets = toy_host.toy_host()
    calls = []
    encode = nets.encode_moments
    host.codec = type("Counting", (), {"encode_moments": lambda self, im: calls.append(1) or encode(im)})()
    train_msi(image(), host, preset(name, steps=12, shape=toy_host.SHAPE))
    assert len(calls) <= 2
    calls.clear()
    train_msi(image(), host, preset(name, steps=12, shape=toy_host.SHAPE, reuse_encodings=False))
    assert len(calls) == 13  # as the reference code: at every step (+ once for key-E's features)


# --- CLIP input -------------------------------------------------------------------------------

def test_clip_input_is_normalised_224_centre_crop():
    grey = torch.full((2, 64, 96, 3), 0.5)
    pixels = to_clip_pixels(grey)
    assert pixels.shape == (2, 3, 224, 224)
    for c in range(3):
        assert torch.allclose(pixels[:, c], torch.tensor((0.5 - CLIP_MEAN[c]) / CLIP_STD[c]), atol=1e-4)
    stripes = torch.zeros(1, 64, 128, 3)
    stripes[:, :, 64:] = 1.0  # right half white: the centre crop keeps both halves
    row = to_clip_pixels(stripes)[0, 0, 112]
    assert row[:100].max() < 0 < row[124:].min()


def test_pick_blocks_needs_a_vit_l_depth():
    outs = [torch.full((1, 2, 3), float(i)) for i in range(24)]
    assert [int(b[0, 0, 0]) for b in pick_blocks(outs)] == [3, 7, 11, 15, 23]
    with pytest.raises(ValueError, match="ViT-L/14 has 24"):
        pick_blocks(outs[:16])


# --- diffusers adapters on tiny models --------------------------------------------------------

def test_text_adapter_replaces_only_the_placeholder(tiny):
    text = tiny_diffusers.tiny_host(tiny).text
    tokens = torch.randn(2, tiny_diffusers.TOKEN_DIM, requires_grad=True)
    cond = text.encode_with_token(tokens)
    assert cond.shape == (2, 77, tiny_diffusers.TOKEN_DIM)
    assert torch.allclose(cond[0, 0], cond[1, 0])  # BOS comes before the token (causal)
    assert not torch.allclose(cond[0, 2:], cond[1, 2:])
    cond.sum().backward()
    assert tokens.grad.abs().sum() > 0
    empty = tiny["text_encoder"](input_ids=text.empty_ids).last_hidden_state
    assert torch.equal(text.encode_empty(), empty) and text.slot.sum() == 1


def test_codec_and_features_adapters(tiny):
    host = tiny_diffusers.tiny_host(tiny)
    mean, std = host.codec.encode_moments(image())
    assert mean.shape == std.shape == (1, 4, 8, 8) and (std > 0).all()
    assert host.codec.decode(mean).shape == (1, 64, 64, 3)
    feats = host.features(image())
    assert len(feats) == 5 and all(f.shape == (1, 17, tiny_diffusers.FEATURE_DIM) for f in feats)
    assert not torch.equal(feats[0], feats[4])


def test_training_on_diffusers_models_touches_only_msi(tiny):
    before = {name: {k: v.clone() for k, v in tiny[name].state_dict().items()}
              for name in ("unet", "vae", "text_encoder", "vision")}
    host = tiny_diffusers.tiny_host(tiny)
    # No weight average: the gradients below are the trained module's own; every stage in
    # the last step, so every layer's projection has one.
    config = preset("fast", steps=3, average=0.0, timesteps_per_step=STAGES, shape=tiny_diffusers.MSI_SHAPE)
    result = train_msi(image(), host, config)
    for name, state in before.items():
        module = tiny[name]
        assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items()), name
    grads = {n: p.grad for n, p in result.msi.named_parameters()}
    assert all(g is not None for g in grads.values())
    # Length-1 attention: the softmax is constant, so queries and keys never matter, and the
    # self-attention block (which only feeds the cross-attention's query) gets no gradient.
    largest = max(float(g.norm()) for g in grads.values())
    silent = {n for n, g in grads.items() if float(g.norm()) < 1e-6 * largest}
    assert silent == {n for n in grads if n.startswith("self_attn.")} | {"cross_attn.to_q.weight", "cross_attn.to_k.weight"}
    assert result.key.stages.shape == (STAGES, 77, tiny_diffusers.TOKEN_DIM)
    assert result.key.uc.shape == (1, 77, tiny_diffusers.TOKEN_DIM)


# --- input checks ----------------------------------------------------------------------------

def test_image_checks_name_the_problem():
    check_images(torch.zeros(2, 64, 72, 3))
    with pytest.raises(ValueError, match="empty image batch"):
        check_images(torch.zeros(0, 64, 64, 3))
    with pytest.raises(ValueError, match="at least 64 x 64 pixels, got 64 x 56"):
        check_images(torch.zeros(1, 56, 64, 3))
    with pytest.raises(ValueError, match="at most 2048 x 2048 pixels, got 2049 x 64; resize"):
        check_images(torch.zeros(1, 64, 2049, 3))
    check_images(torch.zeros(1, 67, 2047, 3))  # any side: the VAE sees it padded


def test_any_size_trains_with_the_vae_seeing_it_padded_and_key_e_records_the_size(tiny):
    host = tiny_diffusers.tiny_host(tiny)
    seen = []
    encode = host.codec.encode_moments
    host.codec.encode_moments = lambda pixels: seen.append(tuple(pixels.shape)) or encode(pixels)
    odd = torch.rand(1, 67, 70, 3, generator=torch.Generator().manual_seed(0))
    result = train_msi(odd, host, preset("fast", steps=2, shape=tiny_diffusers.MSI_SHAPE))
    assert set(seen) == {(1, 72, 72, 3)}
    assert result.key.meta["image_size"] == "70x67"


def test_only_openai_vit_l14_is_accepted():
    check_vit_l14("clip", 1024, 24, 14)
    for wrong in (("clip", 1280, 32, 14), ("siglip", 1024, 24, 14), ("Dinov2Model", 1024, 24, 14), ("clip", 768, 12, 32)):
        with pytest.raises(ValueError, match="OpenAI CLIP ViT-L/14 .*hidden size 1024, 24 layers"):
            check_vit_l14(*wrong)


def test_micro_batches_give_the_same_training():
    """Gradient accumulation over micro-batches is the same update as the whole batch
    (dropout off: its masks are drawn per pass)."""
    host, _ = toy_host.toy_host()
    shape = dataclasses.replace(toy_host.SHAPE, dropout=0.0)
    whole = train_msi(image(), host, preset("fast", steps=5, micro_batch=0, shape=shape))
    parts = train_msi(image(), host, preset("fast", steps=5, micro_batch=3, shape=shape))
    assert whole.losses == pytest.approx(parts.losses, rel=1e-5)
    assert torch.allclose(whole.key.stages, parts.key.stages, atol=1e-5)
    assert whole.key.stages.abs().max() > 0


# --- the fast preset's budget, early stopping, weight averaging ------------------------------

def test_fast_preset_spends_at_most_a_fifth_of_the_faithful_unet_passes():
    fast, faithful = PRESETS["fast"], PRESETS["faithful"]
    probe_passes = (fast.steps // fast.plateau_every) * STAGES
    assert fast.steps * fast.timesteps_per_step + probe_passes <= faithful.steps * faithful.timesteps_per_step / 5


def test_the_default_preset_makes_a_third_of_the_fast_presets_unet_calls_in_sequence():
    """Sequential UNet calls (one a step, one a stopping probe) of each preset's full
    budget, counted as it trains; the default trains four timesteps a step in one call."""
    host, _ = toy_host.toy_host()
    calls = {}
    for name in (msi_train.DEFAULT_PRESET, "fast"):
        counter = PassCounter()
        config = preset(name, plateau_delta=-math.inf, shape=toy_host.SHAPE)  # never a plateau: the whole budget
        train_msi(image(), counter.msi_host(host), config)
        calls[name] = (counter.calls["unet_forward"], counter.as_dict()["unet_backward"])
    assert msi_train.DEFAULT_PRESET == "parallel"
    assert calls["parallel"] == (300 + 6, 4 * 300) and calls["fast"] == (1100 + 5, 1100)
    assert 3 * calls["parallel"][0] < calls["fast"][0]


def test_unet_passes_are_counted_with_the_probe_of_early_stopping():
    host, _ = toy_host.toy_host()
    counter = PassCounter()
    host.eps = counter.eps(host.eps)
    config = preset("fast", steps=40, plateau_every=10, plateau_delta=0.0, plateau_patience=10, shape=toy_host.SHAPE)
    train_msi(image(), host, config)
    assert counter.counts["unet_backward"] == 40  # one timestep per step
    assert counter.counts["unet_forward"] == 40 + 4 * STAGES  # and four probes of ten timesteps


def test_early_stopping_ends_on_a_plateau_and_keeps_the_best_module():
    host, _ = toy_host.toy_host()
    seen = []
    config = preset("fast", steps=100, plateau_every=5, plateau_patience=2, plateau_delta=0.99, average=0.0,
                    shape=toy_host.SHAPE)
    probe = msi_train.held_out(image(), host, rounds=1, seed=config.seed + 1)  # the trainer's stopping probe
    result = train_msi(image(), host, config, probe=lambda step, msi: step % 5 or seen.append(probe(msi)))
    assert len(result.losses) == 15  # best at the first check; no 99% gain in the two after it
    assert probe(result.msi) == min(seen)


def test_weight_average_changes_the_key_not_the_training():
    host, _ = toy_host.toy_host()
    plain, averaged = (train_msi(image(), host, preset("fast", steps=20, average=a, shape=toy_host.SHAPE))
                       for a in (0.0, 0.9))
    assert plain.losses == averaged.losses
    assert not torch.allclose(plain.key.stages, averaged.key.stages)


def test_training_at_timestep_t_conditions_the_unet_on_stage_t_over_100():
    """Eq. 7 at timestep t uses C^{t // 100}: every UNet call of training (and of early
    stopping's probe) gets, for each of its timesteps, the conditioning of that timestep's
    stage and of no other. The learning rate is 0 so the module stays the one the trainer
    built, which the test can then ask for every stage's conditioning; dropout off, no flip."""
    host, nets = toy_host.toy_host()
    calls = []
    eps = host.eps
    host.eps = lambda z_t, t, cond: calls.append((t.clone(), cond.detach().clone())) or eps(z_t, t, cond)
    shape = dataclasses.replace(toy_host.SHAPE, dropout=0.0)
    result = train_msi(image(), host, preset("fast", steps=30, lr=0.0, flip=False, plateau_every=10, shape=shape))
    with torch.no_grad():
        per_stage = nets.encode_with_token(result.msi(nets.features(image()), torch.arange(STAGES)))
    timesteps = torch.cat([t for t, _ in calls])
    conds = torch.cat([cond for _, cond in calls])
    assert len(timesteps) >= 30 and len(set((timesteps // 100).tolist())) == STAGES  # every stage was trained
    distance = (conds[:, None] - per_stage[None]).flatten(2).abs().amax(-1)  # [calls, stages]
    assert torch.equal(distance.argmin(dim=1), timesteps // 100)
    assert (distance.gather(1, (timesteps // 100)[:, None]) < 1e-5).all()
    assert (distance.topk(2, dim=1, largest=False).values[:, 1] > 1e-3).all()  # no other stage would match


# --- the images of a batch trained together ---------------------------------------------------

def test_a_batch_trains_each_image_as_alone_in_one_unet_call_a_step():
    """Three images, with dropout on, flips, early stopping that ends them at different
    steps: together they give each image the key-E and losses it gets alone (float
    rounding aside), in one text-encoder and one UNet call per step (and per early-stopping
    check) for every image still training; micro-batches of at most 2 latents split the
    training calls and change no value."""
    host, _ = toy_host.toy_host()
    images = torch.cat([image(seed) for seed in (0, 1, 2)])
    config = preset("fast", steps=40, timesteps_per_step=2, plateau_every=5, plateau_patience=2,
                    plateau_delta=0.025, shape=toy_host.SHAPE)
    alone = [train_msi(images[i:i + 1], host, config) for i in range(3)]
    counter = PassCounter()
    together = msi_train.train_msi_batch(images, counter.msi_host(host), config)
    steps_run = [len(r.losses) for r in alone]
    assert len(set(steps_run)) > 1, "early stopping should end the images at different steps"
    for one, batched in zip(alone, together):
        assert batched.losses == pytest.approx(one.losses, rel=1e-4, abs=1e-6)
        assert torch.allclose(batched.key.stages, one.key.stages, atol=5e-5)
        assert batched.key.meta == one.key.meta
    probes = max(steps_run) // 5  # forward-only stopping probes: one call for every image still training
    assert counter.calls["unet_backward"] == max(steps_run)
    assert counter.calls["unet_forward"] == max(steps_run) + probes
    assert counter.counts["unet_backward"] + sum(c["unet_backward"] for c in counter.owned.values()) \
        == 2 * sum(steps_run)
    assert [counter.owned[k]["unet_backward"] for k in range(3)] == [2 * n for n in steps_run]
    report = counter.report("MSI Inversion", images=3)
    assert [e["passes"]["unet_backward"] for e in report] == [2 * n for n in steps_run]
    assert all(e["calls"] == counter.calls_dict() and e["batch"] == [0, 1, 2] for e in report)

    small = PassCounter()
    split = msi_train.train_msi_batch(images, small.msi_host(host), dataclasses.replace(config, micro_batch=2))
    assert small.calls["unet_backward"] == sum(steps_run)  # one call per image and step
    for one, batched in zip(together, split):
        assert torch.allclose(batched.key.stages, one.key.stages, atol=5e-5)
