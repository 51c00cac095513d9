"""Long-context evaluation of Megatron checkpoints and Hugging Face models: perplexity by length, passkey.

    perplexity    run(models, lengths, ...)                 (tools/eval_perplexity.py)
    passkey       run(model, lengths, trials=...)           (tools/eval_passkey.py)
    scoring       megatron_token_scores(chunks, tokens, vocab_size=...)   the one scoring path: per-token NLL
                  hf_token_scores(model, tokens)                          and greedy match, any TP/PP
    generation    greedy(megatron_decoder(chunks), prompts, max_new_tokens=..., vocab_size=...)   greedy
                  greedy(hf_decoder(model), prompts, ...)   decoding with a KV cache (megatron-core's static
                                                            inference; generate)
    resolve       ModelSpec, resolve                        which model: its config, rope plan, tokenizer
    loading       Runtime, open_scorer                      how it is loaded and run: scorer.scores, .generate
    command_line  add_model_arguments, parse_lengths, ...   the tools' shared flags
    documents     load_documents, select, windows           indexed / JSONL / default data, windows
    memory        forward_bytes, check_fits, proposing      refuse lengths that cannot fit, name where they would
    plots         plot_perplexity, plot_passkey

megatron-core and transformers are imported only when a model of that kind is loaded.
"""

from megatron_resonance.evaluation.loading import Runtime
from megatron_resonance.evaluation.resolve import ModelSpec
from megatron_resonance.evaluation.scoring import TokenScores, hf_token_scores, megatron_token_scores

__all__ = ["ModelSpec", "Runtime", "TokenScores", "hf_token_scores", "megatron_token_scores"]
