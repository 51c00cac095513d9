"""The Hugging Face boundary: every read and write of Hugging Face files and configs goes through here.

    config   check_llama, from_hf, model_sizes, export_config   config.json <-> LlamaConfig
    rope     rope_from_hf, rope_config_keys, register           rope_scaling / rope_parameters <-> RopeConfig
    reader   HFCheckpoint(path)                                 safetensors or .bin (weights_only), sharded or not
    writer   write_sharded(directory, specs, produce, ...)      safetensors shards + index, two at a time
    assets   copy_assets, carry_assets, default_reference       tokenizer / generation files beside the weights

The default export needs nothing from this package at load time: it encodes every rope plan with
transformers' own rope types (resonance through ``longrope``). Those who prefer the plan spelled out by name
export with ``--rope-format custom`` and call :func:`register` before loading, in every process that loads
the model::

    import megatron_resonance.hf
    megatron_resonance.hf.register()
    model = transformers.AutoModelForCausalLM.from_pretrained("exported/")

A process that did not register fails with ``KeyError: 'megatron_resonance'`` (vLLM, lm-eval, ...).
The frequencies come from ``megatron_resonance.rope`` and the plan recorded in the config
(``megatron_resonance_rope``): the same float64 computation as the Megatron model, rounded to float32.
"""

from megatron_resonance.hf.rope import register

__all__ = ["register"]
