"""The chunk loop: noise → few-step sampler → commit pass → streaming decode.

One :class:`StreamingEngine` owns a model bundle, a memory policy and a streaming VAE decoder, and
produces the video chunk by chunk along a *timeline* (a validated storyboard). For chunk ``c``:

1. pick the prompt in force at the time of the chunk's first video frame (while the prompt's
   ``transition`` runs, its text conditioning is blended from the previous prompt's with the weight
   at that time, ``engine/blend.py``); if it differs from the previous chunk's, do a KV re-cache as the attention preset says (``engine/presets.py``): the policy
   drops what must be recomputed and the engine re-runs those clean latent frames with the new prompt
   at timestep 0 — chunk by chunk (``chunked``) or in one unmasked pass (``one_pass``, LongLive) — or
   keeps the cache (``none``, Self-Forcing);
2. draw the chunk's noise from a generator seeded by (seed, c) and denoise with the model's sampler
   (the few-step Self-Forcing schedule, or the Euler flow ODE), every step attending to ``[memory ; chunk]``;
3. commit: run the clean chunk once more at timestep 0; that pass hands its K/V to the memory;
4. decode the chunk's latents with the causal VAE cache kept across chunks and emit its frames.

Geometry: chunk ``c`` holds latent frames ``[c·F, (c+1)·F)``; with temporal stride s the first chunk
decodes to ``1 + s(F-1)`` video frames and every later chunk to ``s·F`` (9 and 12 for Wan).
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from slotgen.engine.blend import blend_embeddings
from slotgen.engine.attention import CommitDone, RopeTable, StreamState, apply_rope, install_streaming_processors
from slotgen.engine.presets import get_preset
from slotgen.engine.sampler import FlowSchedule, chunk_noise, sample_chunk, x0_predictor
from slotgen.memory.base import ChunkContext, MemoryPolicy
from slotgen.models.bundle import ModelBundle


@dataclass(frozen=True)
class ChunkGeometry:
    """Where chunks fall in latent and video frames."""

    chunk_frames: int  # latent frames per chunk (F)
    stride_t: int  # VAE temporal stride (s)

    def first_frame(self, chunk: int) -> int:
        """Index of the chunk's first video frame."""
        if chunk == 0:
            return 0
        return 1 + self.stride_t * (self.chunk_frames - 1) + self.stride_t * self.chunk_frames * (chunk - 1)

    def video_frames(self, chunk: int) -> int:
        return 1 + self.stride_t * (self.chunk_frames - 1) if chunk == 0 else self.stride_t * self.chunk_frames

    def num_chunks(self, total_frames: int) -> int:
        """Chunks needed to produce at least ``total_frames`` video frames."""
        c = 0
        while self.first_frame(c) < total_frames:
            c += 1
        return c


@dataclass
class ChunkResult:
    chunk: int
    prompt_index: int
    prompt: str
    first_frame: int  # global index of frames[0]
    frames: np.ndarray | None  # (N, H, W, 3) uint8, all frames the chunk decoded to (None: not decoded yet)
    latents: torch.Tensor  # (1, C, F, h, w) clean latents
    seconds: float  # wall time for the chunk (sampling + commit, + decode when decoded inline)
    recached_frames: int = 0


class ChunkRetaken(Exception):
    """``generate_chunk`` gave up the chunk it was sampling because ``retake`` asked for it again; the
    engine's state is as before the chunk began (see :meth:`StreamingEngine.generate_chunk`)."""


@dataclass
class EngineOptions:
    seed: int
    fps: int
    width: int
    height: int
    steps: int
    shift: float
    preset: str | None = None  # attention preset (engine/presets.py); None: the model's (ModelSettings.preset)
    noise_device: str | None = None  # where chunk noise is drawn; None: the model's device (no copies)
    compile: bool = False  # torch.compile the transformer blocks (see compile_blocks)


def compile_blocks(transformer) -> None:
    """``torch.compile`` every transformer block in place: norms, modulation, FFN and residuals become
    fused inductor kernels. The attention processors stay eager (``torch.compiler.disable``: they hold
    per-chunk Python state), so the graphs see fixed chunk shapes whatever the memory holds and the
    blocks, alike in structure, share the compiled graphs instead of compiling one set per layer."""
    for block in transformer.blocks:
        block.compile()


class TextCache:
    """Prompt embeddings computed once per distinct prompt (Wan style: fixed length, padding zeroed)."""

    def __init__(self, bundle: ModelBundle, device: torch.device, dtype: torch.dtype):
        self.bundle, self.device, self.dtype = bundle, device, dtype
        self._embeds: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._keys: dict[tuple[str, int, bool], torch.Tensor] = {}
        self._counts: dict[str, int] = {}

    @torch.no_grad()
    def embeds(self, prompt: str) -> torch.Tensor:
        """(1, L, text_dim) embeddings; rows past the prompt's tokens are zero."""
        if prompt not in self._embeds:
            tok = self.bundle.tokenizer(
                prompt, max_length=self.bundle.settings.text_len, padding="max_length", truncation=True,
                add_special_tokens=True, return_attention_mask=True,
            )  # host lists: the token count is known without asking the device
            enc_device = next(self.bundle.text_encoder.parameters()).device
            ids = torch.tensor([tok["input_ids"]], device=enc_device)  # (1, L)
            mask = torch.tensor([tok["attention_mask"]], device=enc_device)  # (1, L)
            h = self.bundle.text_encoder(ids, mask).last_hidden_state  # (1, L, d)
            h = h * mask[..., None].to(h.dtype)  # zero the padding rows
            self._embeds[prompt] = h.to(self.device, self.dtype)
            self._counts[prompt] = sum(tok["attention_mask"])
            if len(self._embeds) > 64:  # bounded: a story may have unlimited distinct prompts
                old, _ = self._embeds.popitem(last=False)
                self._counts.pop(old, None)
                self._keys = {k: v for k, v in self._keys.items() if k[0] != old}
        return self._embeds[prompt]

    def token_count(self, prompt: str) -> int:
        """Real (non-padding) tokens of the prompt, from the tokenizer's mask (a host integer)."""
        self.embeds(prompt)
        return self._counts[prompt]

    @torch.no_grad()
    def text_keys(self, prompt: str, layer: int, padded: bool = False) -> torch.Tensor:
        """Cross-attention keys of the prompt's real tokens in ``layer``: (1, L', H, D); ``padded``: of all
        ``text_len`` rows, the zeroed padding included (Wan's cross-attention cache): (1, text_len, H, D)."""
        key = (prompt, layer, padded)
        if key not in self._keys:
            tr = self.bundle.transformer
            e = self.embeds(prompt)
            n = e.shape[1] if padded else max(self.token_count(prompt), 1)
            ctx = tr.condition_embedder.text_embedder(e[:, :n])  # (1, L', dim)
            attn2 = tr.blocks[layer].attn2
            self._keys[key] = attn2.norm_k(attn2.to_k(ctx)).unflatten(2, (attn2.heads, -1))
        return self._keys[key]

    def unknown_words(self, prompt: str) -> list[str]:
        """Words the model's tokenizer does not know (word-level vocabularies only)."""
        if self.bundle.vocabulary is None:
            return []
        words = re.findall(r"[\w']+", prompt.lower())
        return sorted({w for w in words if w not in self.bundle.vocabulary})


class StreamingEngine:
    """Generates a timeline chunk by chunk with a memory policy. See the module docstring."""

    def __init__(self, bundle: ModelBundle, policy: MemoryPolicy, options: EngineOptions, decoder=None):
        from slotgen.video.decoder import StreamingDecoder

        self.bundle = bundle
        self.policy = policy
        self.options = options
        self.device, self.dtype = bundle.device, bundle.dtype
        s = bundle.settings
        self.geometry = ChunkGeometry(s.chunk_frames, s.vae_stride_t)
        self.schedule = FlowSchedule(options.steps, options.shift, s.sampler)
        self.latent_hw = (options.height // s.vae_stride_s, options.width // s.vae_stride_s)
        p = bundle.patch_size
        self.token_hw = (self.latent_hw[0] // p[1], self.latent_hw[1] // p[2])
        self.preset = get_preset(options.preset if options.preset is not None else s.preset)
        policy.configure_stream(self.preset, s.chunk_frames)
        self.state = StreamState(memory=policy, rope_mode=self.preset.rope)
        self._processors = install_streaming_processors(bundle.transformer, self.state)
        self._rope = RopeTable(bundle.transformer.rope)
        self._rope.check(max(self.token_hw) - 1)  # grid cells are RoPE positions too
        self._coords_cache = None
        if options.compile:
            compile_blocks(bundle.transformer)
        self.text = TextCache(bundle, self.device, self.dtype)
        self.decoder = decoder if decoder is not None else StreamingDecoder(bundle.vae)
        # progress of the stream
        self.next_chunk = 0
        self.prompt: str | None = None  # prompt of the previous chunk
        self.prompt_index: int | None = None
        self.history: OrderedDict[int, torch.Tensor] = OrderedDict()  # latent frame → (1, C, 1, h, w)

    # -- helpers ------------------------------------------------------------------------------------
    def _coords(self, frame_start: int, num_frames: int) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Token coordinates of latent frames [frame_start, +num_frames): frames (N,), hw (N, 2) and
        the host mirror of frames, ``((frame, tokens), ...)``. Built on the device from host integers
        (no host → device copy) and reused by every forward of the chunk."""
        key = (frame_start, num_frames)
        if self._coords_cache is not None and self._coords_cache[0] == key:
            return self._coords_cache[1]
        th, tw = self.token_hw
        frames = torch.arange(frame_start, frame_start + num_frames, device=self.device).repeat_interleave(th * tw)
        rows = torch.arange(th, device=self.device).repeat_interleave(tw).repeat(num_frames)
        cols = torch.arange(tw, device=self.device).repeat(th * num_frames)
        runs = tuple((f, th * tw) for f in range(frame_start, frame_start + num_frames))
        out = (frames, torch.stack([rows, cols], dim=1), runs)
        self._coords_cache = (key, out)
        return out

    @torch.no_grad()
    def _forward(self, latents: torch.Tensor, timestep: float, frame_start: int, embeds: torch.Tensor,
                 commit: bool) -> torch.Tensor | None:
        """One transformer pass over the chunk's latents; the model output, or None for a commit pass
        (``commit``: its K/V go to the memory, and it ends after the last layer's)."""
        st = self.state
        tr = self.bundle.transformer
        if tr.blocks[0].attn1.processor is not self._processors[0]:  # another engine shares this model
            self._processors = install_streaming_processors(tr, st)
        st.frames, st.hw, st.runs = self._coords(frame_start, latents.shape[2])
        st.commit = commit
        st.text = embeds  # cross-attention K/V are cached per embeddings tensor (one per prompt)
        t = torch.full((latents.shape[0],), float(timestep), device=self.device, dtype=torch.float32)
        try:
            out = self.bundle.transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds,
                                          return_dict=False)[0]
        except CommitDone:  # a commit pass ends once the last layer's K/V are written (engine/attention.py)
            out = None
        finally:
            st.commit = False
        return out

    def _context(self, chunk: int, frame_start: int, num_frames: int, prompt_index: int, prompt: str, recache: bool) -> ChunkContext:
        return ChunkContext(chunk=chunk, frame_start=frame_start, num_frames=num_frames, prompt_index=prompt_index,
                            prompt=prompt, recache=recache, text_keys=lambda layer: self.text.text_keys(prompt, layer),
                            text_keys_padded=lambda layer: self.text.text_keys(prompt, layer, padded=True),
                            rotate_keys=self._rotate_keys)

    def _rotate_keys(self, block) -> torch.Tensor:
        """A memory block's keys rotated at their absolute frames: (B, N, H, D)."""
        cos, sin = self._rope(block.frames, block.hw)
        return apply_rope(block.k.to(self.dtype), cos, sin)

    def _commit(self, ctx: ChunkContext, latents: torch.Tensor, embeds: torch.Tensor) -> None:
        self.policy.begin_chunk(ctx)
        self.state.epoch += 1
        self.state.recache = ctx.recache
        self._forward(latents, 0.0, ctx.frame_start, embeds, commit=True)
        self.state.recache = False
        self.policy.end_chunk()

    def conditioning(self, prompt: str, blend: tuple[str, float, str] | None = None) -> torch.Tensor:
        """The chunk's text conditioning (1, L, d): ``prompt``'s embeddings, or with ``blend`` =
        (previous prompt, weight, "linear"|"slerp") the previous prompt's blended into them."""
        embeds = self.text.embeds(prompt)
        if blend is None:
            return embeds
        previous, weight, mode = blend
        return blend_embeddings(self.text.embeds(previous), embeds, float(weight), mode)

    def _recache(self, chunk: int, prompt_index: int, prompt: str, embeds: torch.Tensor) -> int:
        """KV re-cache: re-run the policy's dropped frames at timestep 0 under the switch chunk's
        conditioning ``embeds`` (the new prompt's, or its transition's first blend; module docstring)."""
        ctx = self._context(chunk, self.geometry.chunk_frames * chunk, 0, prompt_index, prompt, True)
        frames = self.policy.on_prompt_switch(ctx)
        missing = [f for f in frames if f not in self.history]
        if missing:
            raise RuntimeError(f"re-cache needs latent frames {missing} that the engine no longer holds")
        F = self.geometry.chunk_frames
        if frames and self.preset.recache == "one_pass":  # LongLive: one pass, no mask, contiguous frames
            if frames != list(range(frames[0], frames[0] + len(frames))):
                raise RuntimeError(f"one-pass re-cache needs contiguous latent frames, got {frames}")
            latents = torch.cat([self.history[f] for f in frames], dim=2)  # (1, C, len(frames), h, w)
            self._commit(self._context(frames[0] // F, frames[0], len(frames), prompt_index, prompt, True), latents, embeds)
            return len(frames)
        groups: OrderedDict[int, list[int]] = OrderedDict()
        for f in frames:  # keep the original chunk grouping
            groups.setdefault(f // F, []).append(f)
        for c, group in groups.items():
            latents = torch.cat([self.history[f] for f in group], dim=2)  # (1, C, len(group), h, w)
            self._commit(self._context(c, group[0], len(group), prompt_index, prompt, True), latents, embeds)
        return len(frames)

    # -- the loop -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_chunk(self, prompt_index: int, prompt: str, latents: torch.Tensor | None = None,
                       decode: bool = True, blend: tuple[str, float, str] | None = None,
                       retake: Callable[[int], bool] | None = None,
                       on_sampled: Callable[[int, torch.Tensor], None] | None = None) -> ChunkResult:
        """Generate, commit and decode the next chunk under ``prompt``.

        ``blend`` = (previous prompt, weight, "linear"|"slerp"): a prompt transition in progress; the
        chunk is conditioned on :meth:`conditioning` (memory relevance still uses ``prompt``'s text).

        ``decode=False`` leaves ``frames`` None: the caller decodes ``latents`` with ``self.decoder``
        itself, in chunk order (``Renderer.stream`` does it on a worker thread, overlapped).
        ``on_sampled(chunk, latents)``: called with the clean latents as soon as they are final, before
        the commit pass (which only feeds the memory for later chunks), so a caller that decodes them
        elsewhere can show the chunk one transformer pass sooner; ``latents`` are never written after.

        ``latents`` (``(1, C, F, h, w)``, normalised): commit these instead of sampling (teacher forcing,
        e.g. the ground-truth past of ``bench identity --past truth``); everything else is as for a sampled chunk.

        ``retake(chunk) -> bool`` is asked before every transformer block of every forward until the
        commit pass (the re-cache passes of a prompt switch and the denoising steps) and once before the
        commit pass (a live session: a prompt typed while the chunk is made). True abandons the chunk at
        once, mid-forward included: the memory policy is restored from the ``state_dict()`` taken when
        the chunk began and :class:`ChunkRetaken` is raised, so the engine is exactly as before the chunk
        (the caller generates it again, under the new prompt). Nothing else is changed before the commit
        pass: the re-cache and the memory reads (hit counts, relevance scores) touch only the policy
        (a re-cache pass cut short has written some layers' K/V to it: the restore drops them), the
        chunk's noise comes from its own generator seeded by (seed, chunk), the processors' per-chunk
        caches follow ``state.epoch``, the text caches are pure, and the history, ``next_chunk``,
        ``prompt`` and the decoder move after it.
        """
        t0 = time.perf_counter()
        c = self.next_chunk
        F = self.geometry.chunk_frames
        frame_start = c * F
        recached = 0
        saved = self.policy.state_dict() if retake is not None else None  # what a retake restores

        def check() -> None:  # the chunk is not committed yet: give it up if asked
            if retake(c):
                st = self.state
                st.check, st.commit, st.recache = None, False, False
                self.policy.load_state_dict(saved, device=self.device)
                st.epoch += 1  # processors rebuild their memory plan from the restored policy
                raise ChunkRetaken(c)

        self.state.check = check if retake is not None else None  # asked by every block (engine/attention.py)
        try:
            embeds = self.conditioning(prompt, blend)
            if self.prompt is not None and prompt != self.prompt:
                recached = self._recache(c, prompt_index, prompt, embeds)

            ctx = self._context(c, frame_start, F, prompt_index, prompt, False)
            self.policy.begin_chunk(ctx)
            self.state.epoch += 1
            shape = (1, self.bundle.transformer.config.in_channels, F, *self.latent_hw)
            if latents is None:
                noise_device = self.options.noise_device or self.device
                noises = [n.to(self.device, self.dtype) for n in chunk_noise(shape, self.options.seed, c,
                                                                             self.schedule.noise_draws(),
                                                                             device=noise_device)]

                def step(x: torch.Tensor, t: float) -> torch.Tensor:  # one denoising forward
                    return self._forward(x, t, frame_start, embeds, commit=False)

                x0 = sample_chunk(x0_predictor(step, self.bundle.settings.prediction), noises, self.schedule)
            else:
                if tuple(latents.shape) != shape:
                    raise ValueError(f"forced latents must have shape {shape}, got {tuple(latents.shape)}")
                x0 = latents.to(self.device, self.dtype)
            if retake is not None:
                check()  # the last moment a retake is possible: from here on the chunk is committed
        finally:
            self.state.check = None
        if on_sampled is not None:
            on_sampled(c, x0)
        self._forward(x0, 0.0, frame_start, embeds, commit=True)  # commit pass: clean K/V → memory
        self.policy.end_chunk()

        for i in range(F):  # keep what a future re-cache needs, no more
            self.history[frame_start + i] = x0[:, :, i : i + 1]
        while len(self.history) > self.policy.recache_span():
            self.history.popitem(last=False)

        frames = self.decoder.decode_chunk(x0) if decode else None
        self.next_chunk += 1
        self.prompt, self.prompt_index = prompt, prompt_index
        return ChunkResult(c, prompt_index, prompt, self.geometry.first_frame(c), frames, x0,
                           time.perf_counter() - t0, recached)

    def run(self, timeline, decode: bool = True, retake: Callable[[int], bool] | None = None,
            on_sampled: Callable[[int, torch.Tensor], None] | None = None) -> Iterator[ChunkResult]:
        """Generate every remaining chunk of ``timeline`` (a Storyboard: prompts, fps, total frames).

        ``timeline`` may also be a callable returning the current Storyboard, asked again before each
        chunk: a live session (``slotgen.live``) extends its timeline while the stream runs.

        ``retake(chunk) -> bool``: asked before each chunk and while it is made (see
        :meth:`generate_chunk`, as ``on_sampled``); after it returns True the chunk is started again from
        the timeline as it is then (the callable changed it)."""
        current = timeline if callable(timeline) else (lambda: timeline)
        while True:
            if retake is not None:
                retake(self.next_chunk)  # a change decided before the chunk starts costs nothing
            tl = current()
            if self.geometry.first_frame(self.next_chunk) >= tl.total_frames:
                return
            idx, blend = tl.conditioning_at(self.geometry.first_frame(self.next_chunk) / tl.fps)
            try:
                res = self.generate_chunk(idx, tl.prompts[idx].text, decode=decode, blend=blend, retake=retake,
                                          on_sampled=on_sampled)
            except ChunkRetaken:
                continue
            yield res

    # -- persistence (snapshots) -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "next_chunk": self.next_chunk,
            "prompt": self.prompt,
            "prompt_index": self.prompt_index,
            "history_frames": list(self.history.keys()),
            "history": [v.cpu() for v in self.history.values()],
            "memory": self.policy.state_dict(),
            "decoder": self.decoder.state_dict(device="cpu"),
        }

    def load_state_dict(self, state: dict) -> None:
        self.next_chunk = int(state["next_chunk"])
        self.prompt, self.prompt_index = state["prompt"], state["prompt_index"]
        self.history = OrderedDict(
            (int(f), t.to(self.device, self.dtype)) for f, t in zip(state["history_frames"], state["history"])
        )
        self.policy.load_state_dict(state["memory"], device=self.device)
        self.decoder.load_state_dict(state["decoder"])
        self.state.epoch += 1
