"""Model shapes for GPU runs with random weights (no weights travel to the device)."""

from __future__ import annotations

import transformers

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192},
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def config(name: str) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(**{"smollm2": SMOLLM2_135M, "llama3-8b": LLAMA3_8B}[name])
