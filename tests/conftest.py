"""Shared fixtures: tiny random models built from the real diffusers/transformers classes."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The test models are tiny: intra-op threads buy nothing and, on a busy 2-core machine, OpenMP spin
# contention makes them many times slower. Subprocesses (CLI tests) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Each test starts with one intra-op thread: a library call that sets torch's process-wide thread count
    (training, render presets) must not leave a later test in the same xdist worker oversubscribed (the
    live tests render on a worker thread beside the decode thread and time out when spinning)."""
    torch.set_num_threads(1)
    yield


def tiny_bundle(rope_max_seq_len: int = 1024, num_layers: int = 2, seed: int = 0):
    """A ModelBundle whose modules are tiny, randomly initialised real Wan/UMT5 classes."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from slotgen.models.bundle import ModelBundle, ModelSettings, state_digest
    from slotgen.models.miniature import VOCABULARY, build_tokenizer

    torch.manual_seed(seed)
    tr = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=rope_max_seq_len,
    ).eval()
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1).eval()
    tok = build_tokenizer(VOCABULARY)
    te = UMT5EncoderModel(UMT5Config(vocab_size=len(tok.get_vocab()), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                     decoder_start_token_id=0)).eval()
    settings = ModelSettings(resolution=(48, 32), text_len=8)
    return ModelBundle("tiny", tr, vae, te, tok, settings, state_digest(tr, vae, te),
                       frozenset(tok.get_vocab()) - {"[PAD]", "</s>", "[UNK]"})


@pytest.fixture
def bundle():
    return tiny_bundle()


@pytest.fixture(scope="module")
def miniature():
    """The embedded miniature, loaded once per test module."""
    from slotgen.models import load_model

    return load_model("miniature")
