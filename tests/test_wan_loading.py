"""Wan2.1 loading: the random 1.3B build, diffusers folders, causal checkpoints, LoRA merging, refusals.

Everything is tiny and offline: folders are written with ``save_pretrained`` from models built out of
configs, and checkpoints in the original Wan naming are produced by the inverse of
diffusers' ``convert_wan_transformer_to_diffusers`` written out below.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slotgen.errors import ModelError
from slotgen.models import load_model
from slotgen.models.wan import WAN_1_3B_TRANSFORMER, build_random_wan, choose_text_device, fast_init_, load_wan
from slotgen.models.wan_checkpoint import fingerprint_file

TINY_TRANSFORMER = dict(
    patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
    text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
TINY_TEXT = dict(d_model=32, num_layers=1, num_heads=2, d_kv=8, d_ff=32, relative_attention_num_buckets=8,
                 dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
TINY_SETTINGS = {"resolution": [48, 32], "text_len": 8, "window": 6, "sink": 0, "name": "tiny-wan"}  # window, sink: retired keys, still accepted
WIDTH, HEIGHT = 48, 32


# --- helpers -------------------------------------------------------------------------------------------------
def tiny_transformer(seed: int, **overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**TINY_TRANSFORMER, **overrides}).eval()


def diffusers_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of diffusers' converter: diffusers key names → the original Wan repository's names."""
    rules = [
        ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."),
        (".attn1.", ".self_attn."),
        (".attn2.", ".cross_attn."),
        (".to_out.0.", ".o."),
        (".to_q.", ".q."),
        (".to_k.", ".k."),
        (".to_v.", ".v."),
        (".ffn.net.0.proj.", ".ffn.0."),
        (".ffn.net.2.", ".ffn.2."),
        (".norm2.", ".norm3."),  # diffusers' norm2 is the cross-attention norm, the original norm3
        ("proj_out.", "head.head."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        if key == "scale_shift_table":
            new = "head.modulation"
        elif key.endswith(".scale_shift_table"):
            new = key.replace(".scale_shift_table", ".modulation")
        for a, b in rules:
            new = new.replace(a, b)
        out[new] = value.clone()
    return out


def self_forcing_file(path: Path, transformer, generator=None) -> Path:
    """A Self-Forcing style checkpoint: generator_ema (+ optional generator, critic) with 'model.' keys."""
    obj = {"generator_ema": {"model." + k: v for k, v in diffusers_to_original(transformer.state_dict()).items()}}
    if generator is not None:
        obj["generator"] = {"model." + k: v for k, v in diffusers_to_original(generator.state_dict()).items()}
        obj["critic"] = {"model.blocks.0.self_attn.q.weight": torch.zeros(3, 3)}
    torch.save(obj, path)
    return path


def assert_same_weights(model, reference) -> None:
    a, b = model.state_dict(), reference.state_dict()
    assert set(a) == set(b)
    for k in b:
        assert torch.equal(a[k].float(), b[k].float()), k


def transformer_output(model, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 4, 6, generator=g)
    text = torch.randn(1, 8, TINY_TRANSFORMER["text_dim"], generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([625.0]), encoder_hidden_states=text, return_dict=False)[0]


def one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ModelError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    assert re.search(match, message), message
    return message


def write_tiny_wan(root: Path, **save_kw):
    """Write a diffusers-format Wan folder of tiny random modules (transformer seed 0, VAE seed 1, UMT5
    seed 2, the miniature's tokenizer) into ``root``; ``save_kw`` go to the transformer's
    ``save_pretrained`` (e.g. ``max_shard_size``). Returns the transformer."""
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    from slotgen.models.miniature import VOCABULARY, build_tokenizer

    base = tiny_transformer(0)
    base.save_pretrained(root / "transformer", **save_kw)
    torch.manual_seed(1)
    AutoencoderKLWan(**TINY_VAE).save_pretrained(root / "vae")
    tokenizer = build_tokenizer(VOCABULARY)
    torch.manual_seed(2)
    UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer.get_vocab()), **TINY_TEXT)).save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
    return base


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A complete diffusers-format folder (transformer, vae, text_encoder, tokenizer) + slotgen.json."""
    root = tmp_path_factory.mktemp("wan") / "Wan2.1-tiny-Diffusers"
    write_tiny_wan(root)
    (root / "slotgen.json").write_text(json.dumps(TINY_SETTINGS))
    return root


@pytest.fixture
def folder_copy(tiny_folder, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_folder, tmp_path / "copy"))


# --- diffusers folder, end to end ------------------------------------------------------------------------------
class CollectingWriter:
    """A writer for ``Renderer.stream``: keeps the frames in memory."""

    def __init__(self):
        self.frames: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        self.frames.append(np.array(frames))

    def close(self) -> str:
        return "<memory>"

    def abort(self) -> None:
        self.frames.clear()


def test_diffusers_folder_renders_through_the_renderer_with_a_prompt_switch(tiny_folder):
    from slotgen.render import Renderer
    from slotgen.storyboard import parse_storyboard

    story = parse_storyboard(
        f"duration: {33 / 16}\nfps: 16\nresolution: {WIDTH}x{HEIGHT}\nseed: 3\nmodel: {json.dumps(str(tiny_folder))}\n"
        "memory:\n  policy: sink\n  sink: 3\n  window: 3\n"
        "prompts:\n  - prompt: a red circle moves left\n  - at: 1.0\n    prompt: a green square enters from the right\n"
    )
    renderer = Renderer(story)  # loads the folder through slotgen.models.load_model
    bundle = renderer.bundle
    assert bundle.name == "tiny-wan" and bundle.vocabulary is None and bundle.settings.text_len == 8
    assert_same_weights(bundle.transformer, tiny_transformer(0))
    writer = CollectingWriter()
    report = renderer.stream([writer])
    frames = np.concatenate(writer.frames)
    assert report.chunks == 3 and report.prompt_chunks == [0, 0, 1] and frames.shape == (33, HEIGHT, WIDTH, 3)
    assert [len(f) for f in writer.frames] == [9, 12, 12] and frames.dtype == np.uint8
    assert frames.std() > 0  # a random model still draws something, not a constant
    embeds = renderer.engine.text.embeds("a red circle moves left")
    assert embeds.shape == (1, 8, 32) and int((embeds.abs().sum(-1) > 0).sum()) == 5  # 5 words; padding rows zero


def test_diffusers_folder_generates_finite_chunks_with_the_engine(tiny_folder):
    from slotgen.engine.generator import EngineOptions, StreamingEngine
    from slotgen.memory import WindowMemory

    bundle = load_model(str(tiny_folder))
    s = bundle.settings
    engine = StreamingEngine(bundle, WindowMemory(len(bundle.transformer.blocks), window=6),
                             EngineOptions(seed=0, fps=s.fps, width=WIDTH, height=HEIGHT, steps=s.steps, shift=s.shift))
    first = engine.generate_chunk(0, "a red circle")
    second = engine.generate_chunk(0, "a red circle")
    assert first.frames.shape == (9, HEIGHT, WIDTH, 3) and second.frames.shape == (12, HEIGHT, WIDTH, 3)
    for chunk in (first, second):
        assert chunk.latents.shape == (1, 16, 3, HEIGHT // 8, WIDTH // 8) and torch.isfinite(chunk.latents).all()


def test_folder_digest_is_stable_and_tracks_the_weights(tiny_folder, folder_copy):
    from diffusers import AutoencoderKLWan

    a = load_wan(tiny_folder)
    b = load_wan(tiny_folder)
    assert a.digest == b.digest and len(a.digest) == 64
    assert load_wan(folder_copy).digest == a.digest  # identity is the weights, not where they live
    torch.manual_seed(99)
    AutoencoderKLWan(**TINY_VAE).save_pretrained(folder_copy / "vae")
    assert load_wan(folder_copy).digest != a.digest


def test_folder_without_slotgen_json_gets_wan_defaults(folder_copy):
    (folder_copy / "slotgen.json").unlink()
    s = load_wan(folder_copy).settings
    assert (s.steps, s.shift, s.chunk_frames, s.fps, s.resolution, s.text_len) == (4, 5.0, 3, 16, (832, 480), 512)


def test_bf16_keeps_diffusers_fp32_modules(tiny_folder):
    bundle = load_wan(tiny_folder, dtype=torch.bfloat16)
    tr = bundle.transformer
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tr.proj_out.weight.dtype == torch.bfloat16
    for name, p in tr.named_parameters():
        parts = name.split(".")
        if any(m in parts for m in tr._keep_in_fp32_modules):
            assert p.dtype == torch.float32, name
    assert tr.scale_shift_table.dtype == torch.float32 and tr.blocks[0].norm2.weight.dtype == torch.float32
    assert tr.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert bundle.vae.dtype == torch.float32 and bundle.text_encoder.dtype == torch.bfloat16
    x = torch.randn(1, 16, 3, 4, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        out = tr(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 8, 32, dtype=torch.bfloat16),
                 return_dict=False)[0]
    assert torch.isfinite(out.float()).all()


def test_vae_cast_is_silent_and_casts(capfd):
    from diffusers import AutoencoderKLWan

    from slotgen.models.wan import cast_vae

    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1], num_res_blocks=1).eval()
    assert cast_vae(vae, "cpu", torch.bfloat16).dtype == torch.bfloat16
    # diffusers' own `to` warns about an empty list of fp32 modules: a second stderr line under every
    # one-line error of a render on a Wan folder
    assert "kept in float32" not in capfd.readouterr().err


# --- causal checkpoints -------------------------------------------------------------------------------------------
def test_self_forcing_checkpoint_in_original_naming_prefers_ema(tiny_folder, tmp_path):
    ema, plain = tiny_transformer(11), tiny_transformer(12)
    ckpt = self_forcing_file(tmp_path / "self_forcing_dmd.pt", ema, generator=plain)
    saved = torch.load(ckpt, weights_only=True)["generator_ema"]
    assert "model.blocks.0.self_attn.q.weight" in saved and "model.head.modulation" in saved  # original names
    bundle = load_wan(tiny_folder, checkpoint=ckpt)
    assert_same_weights(bundle.transformer, ema)  # strict: nothing missing, nothing unexpected
    assert torch.equal(transformer_output(bundle.transformer), transformer_output(ema))
    assert bundle.digest != load_wan(tiny_folder).digest


@pytest.mark.parametrize("preset, entry", [("self_forcing", "generator_ema"), ("longlive", "generator"),
                                           ("longlive_infinity", "generator"), ("memflow", "generator"),
                                           ("slotgen", "generator_ema")])
def test_the_folder_preset_picks_the_weights_entry_its_project_loads(folder_copy, tmp_path, preset, entry):
    """Self-Forcing's README runs --use_ema; LongLive's and MemFlow's inference configs set use_ema: false."""
    ema, plain = tiny_transformer(11), tiny_transformer(12)
    ckpt = self_forcing_file(tmp_path / "both.pt", ema, generator=plain)
    settings = json.loads((folder_copy / "slotgen.json").read_text())
    (folder_copy / "slotgen.json").write_text(json.dumps({**settings, "preset": preset}))
    bundle = load_wan(folder_copy, checkpoint=ckpt)
    assert bundle.settings.preset == preset
    assert_same_weights(bundle.transformer, ema if entry == "generator_ema" else plain)
    only = tmp_path / "only.pt"  # the other entry is used when the preferred one is absent
    torch.save({"generator": torch.load(ckpt, weights_only=True)["generator"]}, only)
    assert_same_weights(load_wan(folder_copy, checkpoint=only).transformer, plain)


def test_a_storyboards_preset_picks_the_entry_for_a_checkpoint_given_at_load(tiny_folder, tmp_path):
    ema, plain = tiny_transformer(11), tiny_transformer(12)
    ckpt = self_forcing_file(tmp_path / "both.pt", ema, generator=plain)
    bundle = load_model(str(tiny_folder), checkpoint=ckpt, preset="memflow")
    assert bundle.settings.preset == "memflow"
    assert_same_weights(bundle.transformer, plain)
    assert bundle.digest != load_wan(tiny_folder, checkpoint=ckpt).digest  # the entry is part of the identity


def test_unknown_preset_in_slotgen_json_is_one_line(folder_copy):
    settings = json.loads((folder_copy / "slotgen.json").read_text())
    (folder_copy / "slotgen.json").write_text(json.dumps({**settings, "preset": "causvid"}))
    one_line_error(r"'preset' is 'causvid', expected one of \['slotgen', 'self_forcing'", load_wan, folder_copy)


def test_generator_is_used_when_there_is_no_ema(tiny_folder, tmp_path):
    model = tiny_transformer(13)
    wrapped = {"model._fsdp_wrapped_module." + k: v for k, v in diffusers_to_original(model.state_dict()).items()}
    torch.save({"generator": wrapped}, tmp_path / "base.pt")
    bundle = load_wan(tiny_folder, checkpoint=tmp_path / "base.pt")
    assert_same_weights(bundle.transformer, model)


def test_diffusers_named_safetensors_and_folder_checkpoints_load_directly(tiny_folder, tmp_path):
    model = tiny_transformer(14)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "causal.safetensors"))
    assert_same_weights(load_wan(tiny_folder, checkpoint=tmp_path / "causal.safetensors").transformer, model)
    model.save_pretrained(tmp_path / "causal_transformer", max_shard_size="20KB")
    assert len(list((tmp_path / "causal_transformer").glob("*.safetensors"))) > 1  # sharded, with an index
    bundle = load_model(str(tiny_folder), checkpoint=tmp_path / "causal_transformer")
    assert_same_weights(bundle.transformer, model)
    assert torch.equal(transformer_output(bundle.transformer), transformer_output(model))


def test_keys_diffusers_itself_ignores_are_tolerated(tiny_folder, tmp_path):
    model = tiny_transformer(15)
    state = dict(model.state_dict())
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(24)
    torch.save(state, tmp_path / "extra.pt")
    assert_same_weights(load_wan(tiny_folder, checkpoint=tmp_path / "extra.pt").transformer, model)


def test_checkpoint_under_bf16_keeps_fp32_modules_and_values(tiny_folder, tmp_path):
    model = tiny_transformer(16)
    ckpt = self_forcing_file(tmp_path / "sf.pt", model)
    tr = load_wan(tiny_folder, dtype=torch.bfloat16, checkpoint=ckpt).transformer
    assert tr.blocks[1].scale_shift_table.dtype == torch.float32
    assert torch.equal(tr.blocks[1].scale_shift_table, model.blocks[1].scale_shift_table)  # not rounded to bf16
    assert torch.equal(tr.blocks[1].attn1.to_k.weight, model.blocks[1].attn1.to_k.weight.bfloat16())


# --- LongLive / MemFlow LoRA ---------------------------------------------------------------------------------------
LORA_TARGETS = {  # original module path → diffusers parameter it lands in
    "blocks.0.self_attn.q": "blocks.0.attn1.to_q.weight",
    "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0.weight",
    "blocks.1.ffn.0": "blocks.1.ffn.net.0.proj.weight",
}


def lora_tensors(base, rank: int = 4, seed: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    sd = base.state_dict()
    out = {}
    for module, target in LORA_TARGETS.items():
        o, i = sd[target].shape
        out[module] = (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g))
    return out


def write_longlive_pair(folder: Path, base, lora, extra: dict | None = None) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    base_path = folder / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in diffusers_to_original(base.state_dict()).items()}}, base_path)
    peft = {}
    for module, (a, b) in lora.items():
        peft[f"base_model.model.{module}.lora_A.weight"] = a
        peft[f"base_model.model.{module}.lora_B.weight"] = b
    lora_path = folder / "lora.pt"
    torch.save({"generator_lora": peft, **(extra or {})}, lora_path)
    return base_path, lora_path


def expected_merge(base, lora, alpha_over_r: float) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    for module, (a, b) in lora.items():
        target = LORA_TARGETS[module]
        sd[target] = sd[target] + alpha_over_r * (b @ a)
    return sd


def assert_state(model, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-5, msg=k)


def test_lora_pair_merges_with_alpha_equal_to_rank_by_default(tiny_folder, tmp_path):
    base = tiny_transformer(21)
    lora = lora_tensors(base)
    base_path, lora_path = write_longlive_pair(tmp_path / "longlive", base, lora)
    bundle = load_wan(tiny_folder, checkpoint=base_path, lora=lora_path)
    assert_state(bundle.transformer, expected_merge(base, lora, 1.0))
    untouched = "blocks.0.attn1.to_k.weight"
    assert torch.equal(bundle.transformer.state_dict()[untouched], base.state_dict()[untouched])
    # the same pair given as one folder, through the public loader
    via_folder = load_model(str(tiny_folder), checkpoint=tmp_path / "longlive")
    assert_state(via_folder.transformer, expected_merge(base, lora, 1.0))
    assert via_folder.digest == bundle.digest


def test_lora_alpha_from_file_config_and_from_argument(tiny_folder, tmp_path):
    base = tiny_transformer(22)
    lora = lora_tensors(base, rank=4)
    base_path, lora_path = write_longlive_pair(tmp_path / "cfg", base, lora, extra={"adapter_config": {"r": 4, "lora_alpha": 8}})
    assert_state(load_wan(tiny_folder, checkpoint=base_path, lora=lora_path).transformer, expected_merge(base, lora, 2.0))
    assert_state(load_wan(tiny_folder, checkpoint=base_path, lora=lora_path, lora_alpha=2).transformer,
                 expected_merge(base, lora, 0.5))


def test_lora_in_diffusers_naming_and_kohya_layout(tiny_folder, tmp_path):
    base = tiny_transformer(23)
    lora = lora_tensors(base, rank=2)
    torch.save({k: v for k, v in base.state_dict().items()}, tmp_path / "base.pt")
    kohya = {}
    for module, (a, b) in lora.items():
        path = LORA_TARGETS[module][: -len(".weight")]
        kohya[f"{path}.lora_down.weight"] = a
        kohya[f"{path}.lora_up.weight"] = b
        kohya[f"{path}.alpha"] = torch.tensor(1.0)
    save_file(kohya, str(tmp_path / "lora.safetensors"))
    bundle = load_wan(tiny_folder, checkpoint=tmp_path / "base.pt", lora=tmp_path / "lora.safetensors")
    assert_state(bundle.transformer, expected_merge(base, lora, 0.5))


def test_folder_can_name_its_own_causal_weights(folder_copy, tmp_path):
    base = tiny_transformer(24)
    lora = lora_tensors(base)
    write_longlive_pair(folder_copy / "causal" / "longlive", base, lora)
    settings = json.loads((folder_copy / "slotgen.json").read_text())
    (folder_copy / "slotgen.json").write_text(json.dumps({**settings, "checkpoint": "causal/longlive/longlive_base.pt",
                                                          "lora": "causal/longlive/lora.pt", "lora_alpha": 2}))
    assert_state(load_model(str(folder_copy)).transformer, expected_merge(base, lora, 0.5))
    other = tiny_transformer(25)
    ckpt = self_forcing_file(tmp_path / "sf.pt", other)
    assert_same_weights(load_model(str(folder_copy), checkpoint=ckpt).transformer, other)  # the caller's wins


# --- malformed inputs: one line each -----------------------------------------------------------------------------
def test_missing_model_folder_and_sub_folder(tiny_folder, folder_copy, tmp_path):
    one_line_error(r"model folder .*nowhere does not exist", load_wan, tmp_path / "nowhere")
    shutil.rmtree(folder_copy / "tokenizer")
    one_line_error(r"lacks the sub-folder\(s\) tokenizer/; expected transformer/, vae/, text_encoder/, tokenizer/",
                   load_model, str(folder_copy))


def test_broken_sub_folder_is_named(folder_copy):
    (folder_copy / "vae" / "config.json").write_text("{not json")
    one_line_error(r"vae: cannot load the VAE", load_wan, folder_copy)


def test_missing_transformer_weights_are_reported(folder_copy):
    for f in (folder_copy / "transformer").glob("*.safetensors"):
        f.unlink()
    one_line_error(r"transformer: no \*\.safetensors weights", load_wan, folder_copy)


@pytest.mark.parametrize("content,match", [
    ("{oops", r"slotgen\.json:1: invalid JSON"),
    ('["a"]', r"top level is a list, expected an object"),
    ('{"stepz": 4}', r"unknown keys \['stepz'\]"),
    ('{"steps": 0}', r"'steps' is 0, expected an integer >= 1"),
    ('{"shift": "big"}', r"'shift' is 'big', expected a number > 0"),
    ('{"resolution": [832]}', r"'resolution' is \[832\], expected \[width, height\]"),
    ('{"sampler": "ddim"}', r"'sampler' is 'ddim', expected one of \['self_forcing', 'euler'\]"),
    ('{"prediction": "eps"}', r"'prediction' is 'eps', expected one of \['flow', 'sample'\]"),
    ('{"vae_stride_s": 16}', r"compresses 4× in time and 8× in space but the settings say 4×/16×"),
    ('{"lora": "lora.pt"}', r"'lora' needs a 'checkpoint'"),
    ('{"lora_alpha": 0}', r"'lora_alpha' is 0, expected a number > 0"),
    ('{"checkpoint": "causal/missing.pt"}', r"checkpoint .*causal/missing\.pt does not exist"),
])
def test_bad_settings_file(folder_copy, content, match):
    (folder_copy / "slotgen.json").write_text(content)
    one_line_error(match, load_wan, folder_copy)


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def _good_original(seed: int = 31) -> dict[str, torch.Tensor]:
    return {"model." + k: v for k, v in diffusers_to_original(tiny_transformer(seed).state_dict()).items()}


def _bad_shape():
    state = _good_original()
    state["model.blocks.0.ffn.0.weight"] = torch.zeros(64, 24)
    return {"generator": state}


def _missing_two():
    state = _good_original()
    del state["model.blocks.1.self_attn.k.weight"], state["model.head.head.bias"]
    return {"generator_ema": state}


def _unexpected_one():
    state = _good_original()
    state["model.blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    return {"generator_ema": state}


@pytest.mark.parametrize("make,match", [
    (lambda: [1, 2, 3], r"top level is a list, expected a dict"),
    (lambda: {"step": 3, "optimizer": {"lr": 0.1}}, r"top-level keys \['optimizer', 'step'\] — expected 'generator_ema' or 'generator'"),
    (lambda: {"generator": {"model.blocks.0.self_attn.q.weight": "not a tensor"}},
     r"entry 'model\.blocks\.0\.self_attn\.q\.weight' is a str, expected a tensor"),
    (lambda: {"generator_lora": {"a.lora_A.weight": torch.zeros(1)}}, r"holds only LoRA weights"),
    (lambda: {"generator": {"encoder.layer.0.weight": torch.zeros(1)}}, r"neither original Wan nor diffusers"),
    (_bad_shape, r"blocks\.0\.ffn\.net\.0\.proj\.weight \(diffusers names, after conversion\) has shape \(64, 24\) but the "
                 r"model expects \(32, 24\); wrong architecture"),
    (_missing_two, r"2 missing \(first: blocks\.1\.attn1\.to_k\.weight, proj_out\.bias\) weights \(diffusers names"),
    (_unexpected_one, r"1 unexpected \(first: blocks\.0\.attn1\.extra\.weight\) weights"),
    (lambda: {"blocks.0.attn1.to_q.weight": torch.zeros(5, 5)},
     r"blocks\.0\.attn1\.to_q\.weight has shape \(5, 5\) but the model expects \(24, 24\)"),
])
def test_malformed_checkpoints(tiny_folder, tmp_path, make, match):
    path = _save(make(), tmp_path / "bad.pt")
    message = one_line_error(match, load_wan, tiny_folder, checkpoint=path)
    assert str(path) in message


def test_unreadable_files(tiny_folder, tmp_path):
    one_line_error(r"checkpoint .*absent\.pt does not exist", load_wan, tiny_folder, checkpoint=tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    one_line_error(r"junk\.pt: refused to unpickle: torch\.load\(weights_only=True\) rejects it \(Unsupported operand 0\)",
                   load_wan, tiny_folder, checkpoint=tmp_path / "junk.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    one_line_error(r"empty\.pt: not a readable PyTorch checkpoint \(EOFError: the file is empty or truncated\)",
                   load_wan, tiny_folder, checkpoint=tmp_path / "empty.pt")
    whole = tmp_path / "whole.pt"
    torch.save({"generator": tiny_transformer(0).state_dict()}, whole)
    (tmp_path / "half.pt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    one_line_error(r"half\.pt: not a readable PyTorch checkpoint \((RuntimeError|OSError): .*\); expected a complete",
                   load_wan, tiny_folder, checkpoint=tmp_path / "half.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    one_line_error(r"junk\.safetensors: not a valid safetensors file", load_wan, tiny_folder,
                   checkpoint=tmp_path / "junk.safetensors")


def test_malformed_lora(tiny_folder, tmp_path):
    base = tiny_transformer(41)
    base_path = _save(base.state_dict(), tmp_path / "base.pt")
    a, b = torch.zeros(4, 24), torch.zeros(24, 4)
    cases = [
        ({"blocks.0.attn1.to_q.lora_A.weight": a}, r"1 layers have only one of lora_A/lora_B"),
        ({"blocks.0.attn1.to_q.lora_A.weight": a, "blocks.0.attn1.to_q.lora_B.weight": torch.zeros(24, 3)},
         r"expected A \(r, in\) and B \(out, r\) with the same rank"),
        ({"blocks.0.ffn.net.0.proj.lora_A.weight": a, "blocks.0.ffn.net.0.proj.lora_B.weight": b},
         r"adapts a 24×24 layer but the base weight blocks\.0\.ffn\.net\.0\.proj\.weight has shape \(32, 24\)"),
        ({"blocks.0.attn1.to_z.lora_A.weight": a, "blocks.0.attn1.to_z.lora_B.weight": b},
         r"1 adapted layers are not in the base weights \(first: \['blocks\.0\.attn1\.to_z'\]\)"),
        ({"blocks.0.attn1.to_q.lora_A.weight": a, "blocks.0.attn1.to_q.lora_B.weight": b, "optimizer_step": torch.zeros(1)},
         r"1 keys are not LoRA tensors"),
    ]
    for i, (state, match) in enumerate(cases):
        lora_path = _save(state, tmp_path / f"lora{i}.pt")
        message = one_line_error(match, load_wan, tiny_folder, checkpoint=base_path, lora=lora_path)
        assert str(lora_path) in message
    one_line_error(r"LoRA file .*nope\.pt does not exist", load_wan, tiny_folder, checkpoint=base_path, lora=tmp_path / "nope.pt")
    one_line_error(r"needs a base checkpoint", load_wan, tiny_folder, lora=tmp_path / "lora0.pt")
    layout = tmp_path / "two_bases"
    layout.mkdir()
    for name in ("a.pt", "b.pt", "lora.pt"):
        shutil.copy(base_path, layout / name)
    one_line_error(r"2 base weight files \['a\.pt', 'b\.pt'\] beside lora\.pt; expected exactly one", load_wan,
                   tiny_folder, checkpoint=layout)


class Payload:
    """Unpickling this calls ``open(marker, 'w')``: code execution that must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("style", ["torch_zip", "raw_pickle", "raw_pickle_v4", "nested_in_generator", "as_lora"])
def test_malicious_pickle_is_refused_without_running(tiny_folder, tmp_path, style):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if style == "torch_zip":
        torch.save(Payload(marker), path)
    elif style == "raw_pickle":
        path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    elif style == "raw_pickle_v4":  # the safe unpickler stops at the first opcode it does not know
        path.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    else:
        torch.save({"generator_ema": {"model.blocks.0.self_attn.q.weight": Payload(marker)}}, path)
    assert not marker.exists()
    if style == "raw_pickle_v4":
        message = one_line_error(r"refused to unpickle: torch\.load\(weights_only=True\) rejects it \(Unsupported operand",
                                 load_wan, tiny_folder, checkpoint=path)
    elif style == "as_lora":
        base = _save(tiny_transformer(51).state_dict(), tmp_path / "base.pt")
        message = one_line_error(r"refused to unpickle: it references (builtins|io)\.open", load_wan, tiny_folder,
                                 checkpoint=base, lora=path)
    else:
        message = one_line_error(r"refused to unpickle: it references (builtins|io)\.open, which would run code", load_wan,
                                 tiny_folder, checkpoint=path)
    assert str(path) in message and "weights_only=True" in message
    assert not marker.exists()


# --- the random full-size build --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_random_wan_has_the_real_1_3b_architecture():
    bundle = load_model("wan-1.3b-random")
    tr = bundle.transformer
    for key, value in WAN_1_3B_TRANSFORMER.items():
        got = getattr(tr.config, key)
        assert (list(got) if isinstance(got, (tuple, list)) else got) == value, key
    assert sum(p.numel() for p in tr.parameters()) == 1_418_996_800
    assert (bundle.vae.config.base_dim, bundle.vae.config.z_dim, list(bundle.vae.config.dim_mult)) == (96, 16, [1, 2, 4, 4])
    assert bundle.text_encoder.config.d_model == 4096 and bundle.settings.text_len == 512
    assert bundle.settings.resolution == (832, 480)
    assert bundle.vocabulary and "circle" in bundle.vocabulary
    assert tr.dtype == torch.float32 and len(bundle.digest) == 64
    ids = bundle.tokenizer("a red circle", max_length=8, padding="max_length", return_tensors="pt")  # 512 in use
    with torch.no_grad():  # (a full forward reads all 5.7 GB of weights: the tiny tests run that code path)
        text = bundle.text_encoder(ids.input_ids, ids.attention_mask).last_hidden_state
        context = tr.condition_embedder.text_embedder(text)
    assert text.shape == (1, 8, 4096) and context.shape == (1, 8, 1536) and torch.isfinite(context).all()
    assert torch.isfinite(tr.rope.freqs_cos).all() and tr.rope.freqs_cos.shape[0] == 1024
    w = tr.blocks[29].ffn.net[2].weight  # (1536, 8960): U(±1/sqrt(8960)), as nn.Linear's default init
    assert w.abs().max() <= 8960 ** -0.5 and w.std() > 0.5 * 8960 ** -0.5


def tiny_random(seed: int = 0, dtype=None):
    return build_random_wan("cpu", dtype=dtype, seed=seed, transformer_config=TINY_TRANSFORMER, vae_config=TINY_VAE,
                            text_config=TINY_TEXT)


def test_random_build_is_seeded():
    a, b, c = tiny_random(0), tiny_random(0), tiny_random(1)
    assert_same_weights(a.transformer, b.transformer)
    assert_same_weights(a.vae, b.vae)
    assert a.digest == b.digest != c.digest
    assert not torch.equal(a.transformer.blocks[0].attn1.to_q.weight, c.transformer.blocks[0].attn1.to_q.weight)
    assert torch.equal(a.transformer.rope.freqs_cos, tiny_transformer(0).rope.freqs_cos)  # rebuilt, not left empty


def test_random_build_in_bf16_keeps_fp32_modules_and_runs():
    bundle = tiny_random(dtype=torch.bfloat16)
    tr = bundle.transformer
    assert tr.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert tr.blocks[0].scale_shift_table.dtype == torch.float32 and tr.rope.freqs_cos.dtype == torch.float32
    assert tr.condition_embedder.time_embedder.linear_2.bias.dtype == torch.float32
    x = torch.randn(1, 16, 3, 4, 6, dtype=torch.bfloat16)
    with torch.no_grad():
        y = tr(hidden_states=x, timestep=torch.tensor([250.0]), encoder_hidden_states=torch.randn(1, 8, 32, dtype=torch.bfloat16),
               return_dict=False)[0]
    assert torch.isfinite(y.float()).all()


def test_fast_init_uses_pytorch_default_distributions():
    model = torch.nn.Sequential(torch.nn.Linear(400, 300), torch.nn.LayerNorm(300))
    model[1].weight.data.zero_()
    fast_init_(model, torch.Generator().manual_seed(0))
    bound = 1 / 400 ** 0.5
    w = model[0].weight
    assert w.abs().max() <= bound and abs(w.std().item() - bound / 3 ** 0.5) < 0.02 * bound
    assert model[0].bias.abs().max() <= bound and model[0].bias.std() > 0
    assert torch.equal(model[1].weight, torch.ones(300)) and torch.equal(model[1].bias, torch.zeros(300))


# --- small policies -----------------------------------------------------------------------------------------------
def test_text_device_choice():
    cuda = torch.device("cuda")
    assert choose_text_device(cuda, "auto", gpu_memory=80 * 1024**3) == cuda
    assert choose_text_device(cuda, "auto", gpu_memory=24 * 1024**3) == torch.device("cpu")
    assert choose_text_device(torch.device("cpu"), "auto") == torch.device("cpu")
    assert choose_text_device(cuda, "cpu") == torch.device("cpu")
    one_line_error(r"text device 'gpu0' is not a torch device", choose_text_device, cuda, "gpu0")


def test_fingerprint_samples_large_files_and_full_mode_reads_everything(tmp_path):
    data = bytearray(np.random.default_rng(0).integers(0, 256, 8 * 1024 * 1024, dtype=np.uint8).tobytes())
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    sampled, full = fingerprint_file(path), fingerprint_file(path, "full")
    data[0] ^= 1  # inside the first sampled block
    path.write_bytes(data)
    assert fingerprint_file(path) != sampled
    data[0] ^= 1
    data[200 * 1024] ^= 1  # between sampled blocks: only the full hash sees it
    path.write_bytes(data)
    assert fingerprint_file(path) == sampled and fingerprint_file(path, "full") != full


def test_cli_render_and_resume_with_a_self_forcing_checkpoint(tiny_folder, tmp_path):
    """`slotgen render --model FOLDER --checkpoint CKPT` and `resume --checkpoint` work end to end."""
    from typer.testing import CliRunner

    from slotgen.cli import app
    from slotgen.video.writer import read_video

    ckpt = self_forcing_file(tmp_path / "self_forcing_dmd.pt", tiny_transformer(11))
    story = tmp_path / "s.yaml"
    story.write_text(f"duration: {21 / 16}\nfps: 16\nresolution: {WIDTH}x{HEIGHT}\nmodel: {json.dumps(str(tiny_folder))}\n"
                     "prompts:\n  - prompt: a red circle moves left\n")
    runner = CliRunner()
    args = ["render", str(story), "-o", str(tmp_path / "a.mkv"), "--snapshot", str(tmp_path / "a.pt"), "--quiet"]
    res = runner.invoke(app, args + ["--checkpoint", str(ckpt)])
    assert res.exit_code == 0, res.output
    plain = runner.invoke(app, ["render", str(story), "-o", str(tmp_path / "p.mkv"), "--quiet"])
    assert plain.exit_code == 0, plain.output
    # the checkpoint's weights, not the folder's, drew the video
    assert not np.array_equal(read_video(tmp_path / "a.mkv"), read_video(tmp_path / "p.mkv"))
    # resuming needs the same weights: without the checkpoint the digest differs (clear one-line error)
    more = ["resume", str(tmp_path / "a.pt"), "-o", str(tmp_path / "b.mkv"), "-p", "a red circle moves left",
            "-d", "0.75s", "--quiet"]
    res = runner.invoke(app, more)
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = runner.invoke(app, more + ["--checkpoint", str(ckpt)])
    assert res.exit_code == 0, res.output
    assert len(read_video(tmp_path / "b.mkv")) == 12
