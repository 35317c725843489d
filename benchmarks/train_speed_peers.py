"""The peers of `train_speed.py`: each PyPI system's model and loss at the benchmark's shape, as builder methods
of `TrainSystem` (`train_speed_systems.py`), which mixes them in and picks one by name (`_build_xt_full`
for `xt-full`). A builder reads `self.shape`, `self.inputs`, `self.labels` (and `self.stream`, inputs with
the last label) and `self.torch`, which TrainSystem sets before building, and returns (modules whose
parameters train, a function computing the loss, a description)."""

from __future__ import annotations

import math


def d_ff_of(d_model: int) -> int:
    """stm's default SwiGLU width (TransformerConfig): 8/3 * d_model rounded up to a multiple of 64."""
    return 64 * math.ceil(d_model * 8 / 3 / 64)


class PeerModels:
    """The peers' builders (x-transformers, local-attention, recurrent-memory-transformer-pytorch, Hugging Face
    Llama), mixed into `TrainSystem`."""

    def _xt_decoder_kwargs(self):
        s = self.shape
        return dict(dim=s["d_model"], depth=s["n_layers"], heads=s["n_heads"],
                    attn_dim_head=s["d_model"] // s["n_heads"], attn_flash=True, rotary_pos_emb=True,
                    use_rmsnorm=True, ff_glu=True, ff_swish=True, ff_mult=d_ff_of(s["d_model"]) / s["d_model"],
                    ff_no_bias=True)

    def _cross_entropy(self, logits, labels):
        F = self.torch.nn.functional
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    def _build_xt_full(self, **attn_kwargs):
        from x_transformers import Decoder, TransformerWrapper

        s = self.shape
        seq = s["segment_len"] * s["n_segments"]
        model = TransformerWrapper(num_tokens=s["vocab_size"], max_seq_len=seq, use_abs_pos_emb=False,
                                   tie_embedding=True, attn_layers=Decoder(**self._xt_decoder_kwargs(), **attn_kwargs))

        def loss():
            return self._cross_entropy(model(self.inputs), self.labels)

        what = f"local attention, attn_max_attend_past={attn_kwargs['attn_max_attend_past']}" if attn_kwargs \
            else "full causal attention"
        return [model], loss, f"x-transformers TransformerWrapper(Decoder) over {seq} tokens, {what}"

    def _build_xt_local(self):
        # a query sees keys at distance <= max_attend_past: itself and the window - 1 before it
        return self._build_xt_full(attn_max_attend_past=self.shape["window"] - 1)

    def _build_la_local(self):
        """local-attention's LocalTransformer: causal attention in blocks of `window_size` tokens, each block's
        queries against its own block and the `look_backward` blocks before it. With exact_windowsize=True (its
        LocalMHA's default) a key is kept when it is at most window_size * look_backward positions before the
        query, so a query sees itself and the window_size * look_backward tokens before it. Our window of W (each
        token sees itself and the W - 1 before it) is therefore window_size * look_backward = W - 1: here
        window_size=511, look_backward=1. That is exactly our window, for every token, the first ones included
        (a token near the start sees all the tokens before it, as ours). 511 does not divide 2048, so LocalMHA
        pads the sequence at the end to 2555 (its autopad, always on): the padding only adds positions after
        every real query (the causal mask hides them from it) and is cut off the output, but its queries are
        computed too (25% more attention rows). The power-of-two configuration window_size=512, look_backward=1
        pads nothing but lets a query see 512 tokens before it (a window of 513), and without exact_windowsize
        a query sees between 513 and 1024 keys (the whole previous block). The other exact factoring of 511
        (window_size=73, look_backward=7) pads less but copies every key and value 8 times.

        Shapes that differ where the package does not let us choose: a learned absolute position embedding
        (max_seq_len x width, on top of the rotary embedding inside the attention), LayerNorm instead of RMSNorm,
        GEGLU instead of SwiGLU (same width), an untied output layer. One residual stream
        (num_residual_streams=1: no hyper-connections), as everyone else."""
        from local_attention import LocalTransformer

        s = self.shape
        seq = s["segment_len"] * s["n_segments"]
        window, look_backward = s["window"] - 1, 1
        d_ff = d_ff_of(s["d_model"])
        model = LocalTransformer(
            num_tokens=s["vocab_size"], max_seq_len=seq, dim=s["d_model"], depth=s["n_layers"], causal=True,
            local_attn_window_size=window, look_backward=look_backward, exact_windowsize=True,
            dim_head=s["d_model"] // s["n_heads"], heads=s["n_heads"],
            ff_mult=d_ff * 3 / (2 * s["d_model"]),  # its GEGLU width is int(dim * mult * 2 / 3)
            num_residual_streams=1,
        )

        def loss():
            return self._cross_entropy(model(self.inputs), self.labels)

        return [model], loss, (f"local-attention LocalTransformer over {seq} tokens, local_attn_window_size={window}, "
                               f"look_backward={look_backward}, exact_windowsize=True: itself and the "
                               f"{window * look_backward} before it")

    def _build_xt_xl(self):
        from x_transformers import Decoder, TransformerWrapper

        s = self.shape
        model = TransformerWrapper(num_tokens=s["vocab_size"], max_seq_len=s["segment_len"],
                                   max_mem_len=s["mem_len"], use_abs_pos_emb=False, tie_embedding=True,
                                   attn_layers=Decoder(**self._xt_decoder_kwargs()))
        L = s["segment_len"]

        def loss():
            mems, total = None, 0.0
            for k in range(s["n_segments"]):
                logits, mems = model(self.inputs[:, k * L:(k + 1) * L], mems=mems, return_mems=True)
                total = total + self._cross_entropy(logits, self.labels[:, k * L:(k + 1) * L])
            return total / s["n_segments"]

        return [model], loss, (f"x-transformers TransformerWrapper(max_mem_len={s['mem_len']}) over "
                               f"{s['n_segments']} segments of {L}, passing mems/return_mems (detached)")

    def _build_rmt_pytorch(self):
        from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

        s = self.shape
        d_ff = d_ff_of(s["d_model"])
        transformer = RecurrentMemoryTransformer(
            s["d_model"], num_tokens=s["vocab_size"], depth=s["n_layers"], heads=s["n_heads"],
            dim_head=s["d_model"] // s["n_heads"], num_memory_tokens=s["memory_tokens"], seq_len=s["segment_len"],
            causal=True, ff_mult=d_ff * 3 / (2 * s["d_model"]),  # its GEGLU width is int(dim * mult * 2 / 3)
            use_flash_attn=True, abs_pos_emb=False, rotary_pos_emb=True,
            use_xl_memories=False,  # plain RMT: the wrapper never feeds XL memories back anyway
            num_residual_streams=1,  # no hyper-connections: one residual stream, as everyone else
        )
        wrapper = RecurrentMemoryTransformerWrapper(transformer)

        def loss():
            out, _ = wrapper(self.stream, return_loss=True)  # it splits off the labels itself
            return out

        return [wrapper], loss, (f"recurrent-memory-transformer-pytorch RecurrentMemoryTransformerWrapper, "
                                 f"{s['memory_tokens']} memory tokens, seq_len {s['segment_len']}, "
                                 f"{s['n_segments']} segments, full BPTT")

    def _build_hf_llama(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        s = self.shape
        seq = s["segment_len"] * s["n_segments"]
        config = LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["d_model"],
                             intermediate_size=d_ff_of(s["d_model"]), num_hidden_layers=s["n_layers"],
                             num_attention_heads=s["n_heads"], num_key_value_heads=s["n_heads"],
                             max_position_embeddings=seq, tie_word_embeddings=True, attn_implementation="sdpa")
        model = LlamaForCausalLM(config)

        def loss():
            return self._cross_entropy(model(input_ids=self.inputs, use_cache=False).logits, self.labels)

        return [model], loss, f"transformers LlamaForCausalLM (sdpa) over {seq} tokens, full causal"
