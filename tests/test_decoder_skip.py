"""The streaming decoder skips residual/attention blocks that provably add exactly zero (the miniature's
exact VAE), and its frames stay bit-identical to diffusers' own ``vae.decode``."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from slotgen.models.miniature import VAE_CONFIG, make_exact_vae
from slotgen.video.decoder import StreamingDecoder, skip_identity_blocks


def _decode_in_chunks(decoder: StreamingDecoder, z: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([decoder.decode_chunk_float(z[:, :, i : i + chunk]) for i in range(0, z.shape[2], chunk)], 2)


def test_exact_vae_decodes_bit_identically_without_its_identity_blocks():
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()
    make_exact_vae(vae)
    decoder = StreamingDecoder(vae)
    # mid block: 2 residual blocks + attention; one up block: 2 residual blocks
    assert decoder.skipped_blocks == 5 and decoder._decoder is not vae.decoder
    z = torch.randn(1, 48, 7, 16, 16)
    with torch.no_grad():
        reference = vae.decode(decoder.denormalize(z)).sample  # diffusers, every block run
    assert torch.equal(_decode_in_chunks(decoder, z, 3), reference)
    # nothing of the VAE changed, and the view shares its parameters
    assert all(m is n for m, n in zip(vae.decoder.conv_in.parameters(), decoder._decoder.conv_in.parameters()))
    assert sum(1 for _ in vae.decoder.modules()) > sum(1 for _ in decoder._decoder.modules())
    # a restored state continues identically (the cache layout is the full decoder's)
    again = StreamingDecoder(vae)
    again.decode_chunk_float(z[:, :, :3])
    state = again.state_dict()
    resumed = StreamingDecoder(vae)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.decode_chunk_float(z[:, :, 3:]), reference[:, :, 3:])


def test_blocks_that_compute_something_are_kept():
    torch.manual_seed(1)
    vae = AutoencoderKLWan(**VAE_CONFIG).eval()  # random init: every conv2 and proj is non-zero
    view, skipped = skip_identity_blocks(vae.decoder)
    assert skipped == 0 and view is vae.decoder
    make_exact_vae(vae)
    with torch.no_grad():
        vae.decoder.mid_block.resnets[0].conv2.bias[0] = 1e-3  # this block now adds something
    _, skipped = skip_identity_blocks(vae.decoder)
    assert skipped == 4
    z = torch.randn(1, 48, 4, 16, 16)
    decoder = StreamingDecoder(vae)
    with torch.no_grad():
        assert torch.equal(_decode_in_chunks(decoder, z, 2), vae.decode(decoder.denormalize(z)).sample)


def test_a_decoder_without_data_skips_nothing():
    # `bench flops` builds models on the meta device: no weight can be proven zero there, and asking
    # would fail (a meta tensor has no value), so the full decoder is counted
    with torch.device("meta"):
        vae = AutoencoderKLWan(**VAE_CONFIG).eval()
    view, skipped = skip_identity_blocks(vae.decoder)
    assert skipped == 0 and view is vae.decoder
