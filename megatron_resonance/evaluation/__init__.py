"""Long-context evaluation of Megatron checkpoints and Hugging Face models: perplexity by length, passkey.

    perplexity  run(models, lengths, ...) / main(argv)     tools/eval_perplexity.py
    passkey     run(model, lengths, trials=...) / main()   tools/eval_passkey.py
    scoring     megatron_token_scores(chunks, tokens, vocab_size=...)   the reusable forward: per-token NLL
                hf_token_scores(model, tokens)                          and greedy match, any TP/PP
    models      ModelSpec, resolve, open_scorer, Runtime   which model, how it is loaded and run
    documents   load_documents, select, windows            indexed / JSONL / default data, windows
    memory      forward_bytes, check_fits                  refuse lengths that cannot fit
    plots       plot_perplexity, plot_passkey

megatron-core and transformers are imported only when a model of that kind is loaded.
"""

from megatron_resonance.evaluation.models import ModelSpec, Runtime
from megatron_resonance.evaluation.scoring import TokenScores, hf_token_scores, megatron_token_scores

__all__ = ["ModelSpec", "Runtime", "TokenScores", "hf_token_scores", "megatron_token_scores"]
